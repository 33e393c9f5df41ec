"""The KV blocks' bookkeeping and the prefix cache, in one home.

``BlockAllocator`` hands out and reference-counts blocks. ``PrefixCache`` is everything prefix caching does:
the hash of a sequence's full blocks (``block_hash``, chained), the lookup at admission (the scheduler asks it),
registering blocks once computed (the engine tells it after each step) and the hit counts the metrics report.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable

from lorafleet.server.engine.sequence import Sequence


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

    def shrink(self, table: list[int], num_tokens: int) -> None:
        """Free the blocks past those ``num_tokens`` tokens need (a verify step's rejected proposals: never cached)."""
        keep = -(-num_tokens // self.block_size)
        if len(table) > keep:
            spare = table[keep:]
            del table[keep:]
            self.free(spare)

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


class PrefixCache:
    """A sequence's full blocks by the hash of their contents: found at admission, registered once computed.

    ``adapter_identity(key)`` is what an adapter adds to the hash (its key and content fingerprint); it is asked only
    for adapters on the device, where a sequence is admitted.
    """

    def __init__(self, allocator: BlockAllocator, adapter_identity: Callable[[str], bytes]) -> None:
        self.allocator = allocator
        self.block_size = allocator.block_size
        self.adapter_identity = adapter_identity
        self.queried_tokens = 0  # prompt tokens looked up, and those found (vllm:prefix_cache_queries / _hits)
        self.hit_tokens = 0

    def hashes(self, seq: Sequence, count: int) -> list[bytes]:
        """The hashes of ``seq``'s first ``count`` full blocks, extending its chain as far as needed."""
        bs, hashes = self.block_size, seq.block_hashes
        if len(hashes) < count:
            adapter = self.adapter_identity(seq.adapter) if seq.adapter is not None else b""
            for i in range(len(hashes), count):
                hashes.append(block_hash(hashes[i - 1] if i else seq.params.cache_salt, adapter, seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes[:count]

    def take(self, seq: Sequence) -> int:
        """Start ``seq`` from the cached blocks of its prefix: tokens found (at most all but the last, which must run
        to give the next token's logits). Requests for prompt logprobs compute every token."""
        if seq.num_computed or seq.params.prefill_logprobs:
            return 0
        blocks = self.allocator.take_cached(self.hashes(seq, (len(seq.token_ids) - 1) // self.block_size))
        seq.block_table[:] = blocks
        seq.num_computed = len(blocks) * self.block_size
        seq.num_registered = len(blocks)
        if seq.num_cached_tokens == 0 and seq.first_scheduled_at is None:
            seq.num_cached_tokens = seq.num_computed
        return seq.num_computed

    def give_back(self, seq: Sequence) -> None:
        """Admission failed after the lookup: give the blocks back (they stay cached) and start over next step."""
        self.allocator.free(seq.block_table)
        seq.num_computed = seq.num_registered = 0

    def admitted(self, seq: Sequence, hits: int) -> None:
        self.queried_tokens += len(seq.token_ids)
        self.hit_tokens += hits

    def register(self, seq: Sequence) -> None:
        """Offer ``seq``'s newly full, computed blocks to the cache."""
        full = seq.num_computed // self.block_size
        if full > seq.num_registered:
            for i, hashed in enumerate(self.hashes(seq, full)[seq.num_registered:], start=seq.num_registered):
                self.allocator.register(seq.block_table[i], hashed)
            seq.num_registered = full
