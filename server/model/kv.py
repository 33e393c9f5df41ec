"""The paged KV cache's tensors, and where a token of a sequence lives in them.

Each sequence owns a block table (a list of block ids, handed out by server/engine/blocks.py); token t of the
sequence lives in block ``table[t // block_size]`` at offset ``t % block_size``. The model reads and writes these
tensors; the engine only decides which blocks a sequence owns, so the tensors live with the model (as in gpt-fast).
"""

from __future__ import annotations

import torch

from lorafleet.server.model.checkpoint import ModelConfig


def cache_slot(block_table: list[int], position: int, block_size: int) -> int:
    """The flat cache index of a sequence's token at ``position``."""
    return block_table[position // block_size] * block_size + position % block_size


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
