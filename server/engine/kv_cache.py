"""The paged KV cache: a pool of fixed-size blocks and the allocator that hands them out.

Each sequence owns a block table (a list of block ids); token t of the sequence lives in block
``table[t // block_size]`` at offset ``t % block_size``. Blocks are allocated on admission and as
a sequence grows, and returned when it finishes, is cancelled or is preempted.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from lorafleet.server.model.checkpoint import ModelConfig


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat cache index of a sequence's token at ``position``."""
    return block_table[position // block_size] * block_size + position % block_size


class OutOfBlocks(RuntimeError):
    """The pool has no free block; the scheduler preempts instead of failing."""


class BlockAllocator:
    """Hands out KV blocks, and with ``caching`` keeps full blocks findable by the hash of their contents.

    A full block's hash chains over every token before it and the adapter that computed it (see
    ``block_hash``), so a hit is the exact keys and values a recompute would write. Blocks are
    reference-counted: a hit shares a block between sequences; the last, partial block of a sequence is
    never shared (hits are full blocks only, and a sequence always computes at least its last token), so
    nothing shared is ever written. A block nobody uses stays cached in the free list, and is evicted
    (its hash forgotten) only when a fresh block is needed: blocks that were never cached go first, then
    cached ones, least recently freed first.
    """

    def __init__(self, num_blocks: int, block_size: int, caching: bool = False) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # the front is reused first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, bytes] = {}
        self._cached: dict[bytes, int] = {}
        self.queried_tokens = 0  # prompt tokens looked up, and those found (vllm:prefix_cache_queries / _hits)
        self.hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        needed = self.blocks_needed(table, num_tokens)
        if needed > self.num_free:
            raise OutOfBlocks(f"need {needed} blocks, {self.num_free} free")
        for _ in range(needed):
            block, _ = self._free.popitem(last=False)
            evicted = self._hash_of.pop(block, None)
            if evicted is not None:
                del self._cached[evicted]
            self._refs[block] = 1
            table.append(block)

    def free(self, table: list[int]) -> None:
        """Drop one reference to each block; the table's head is freed last, so it stays cached longest."""
        for block in reversed(table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
                if block not in self._hash_of:
                    self._free.move_to_end(block, last=False)  # nothing to keep: reused before any cached block
        table.clear()

    def blank_blocks(self) -> list[int]:
        """Free blocks that hold no cached prefix: what they contain is left over from a finished sequence."""
        return [block for block in self._free if block not in self._hash_of]

    def take_cached(self, hashes: list[bytes]) -> list[int]:
        """The longest run of cached blocks for ``hashes`` (a sequence's full blocks, in order), each referenced once more."""
        blocks = []
        for block_hash in hashes:
            block = self._cached.get(block_hash)
            if block is None:
                break
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
            blocks.append(block)
        return blocks

    def register(self, block: int, block_hash: bytes) -> None:
        """``block`` now holds what ``block_hash`` names (a block computed twice concurrently keeps the first)."""
        if block_hash not in self._cached and block not in self._hash_of:
            self._cached[block_hash] = block
            self._hash_of[block] = block_hash


def block_hash(previous: bytes, adapter: bytes, tokens: list[int]) -> bytes:
    """A full block's identity: the chain before it, what computed it (b"" for the base model, else the
    adapter's key and content fingerprint: an adapter on any layer changes every later layer's keys and
    values) and its tokens."""
    return hashlib.blake2b(previous + b"\0" + adapter + b"\0" + array("q", tokens).tobytes(), digest_size=16).digest()


class KVCache:
    """One key and one value tensor per layer: [num_blocks, block_size, kv_heads, head_dim]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.block_size = block_size

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_layers * block_size * config.num_kv_heads * config.head_dim * element
