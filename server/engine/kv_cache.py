"""The paged KV cache: a pool of fixed-size blocks and the allocator that hands them out.

Each sequence owns a block table (a list of block ids); token t of the sequence lives in block
``table[t // block_size]`` at offset ``t % block_size``. Blocks are allocated on admission and as
a sequence grows, and returned when it finishes, is cancelled or is preempted.
"""

from __future__ import annotations

from collections import deque

import torch

from lorafleet.server.model.checkpoint import ModelConfig


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat cache index of a sequence's token at ``position``."""
    return block_table[position // block_size] * block_size + position % block_size


class OutOfBlocks(RuntimeError):
    """The pool has no free block; the scheduler preempts instead of failing."""


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """How many more blocks a table needs to hold ``num_tokens`` tokens."""
        return max(0, -(-num_tokens // self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        needed = self.blocks_needed(table, num_tokens)
        if needed > self.num_free:
            raise OutOfBlocks(f"need {needed} blocks, {self.num_free} free")
        table.extend(self._free.popleft() for _ in range(needed))

    def free(self, table: list[int]) -> None:
        self._free.extend(table)
        table.clear()


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
