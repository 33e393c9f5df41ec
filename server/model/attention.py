"""Attention over the paged KV cache, and the per-step metadata that describes the batch.

A step's batch is flat: the tokens of every sequence laid end to end, a prefill chunk
contributing many and a decoding sequence one. The torch path here is the reference and the CPU
path: prefill chunks attend one sequence at a time (a causal mask offset by what the cache already
holds); decoding sequences attend together in one padded, masked SDPA call, which is where a
large batch spends its attention time.

Isolation: a padded decode row reads positions its sequence never wrote, which hold whatever another
sequence left there, NaN included. A mask alone does not keep them out: a masked key still meets
``0 * value`` in the weighted sum, and ``0 * NaN`` is NaN. Two rules close it. Padding entries of a decode
block table name the null block, which nothing ever writes (the engine allocates it zeroed and hands it to
no sequence); and the tail of each row's last block, past its length, is zeroed in the gathered copy (at
most block_size - 1 positions a row). The Triton kernel never loads either. Nothing one sequence writes
into the cache can then change another's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSegment:
    start: int  # first token of the chunk in the flat batch
    end: int
    context_len: int  # tokens of this sequence in the cache once the chunk is written
    block_table: torch.Tensor


@dataclass(slots=True)
class BatchMetadata:
    slot_mapping: torch.Tensor  # [T] flat cache index of each new token
    prefills: list[PrefillSegment]
    decode_rows: torch.Tensor  # [Bd] token index of each decoding sequence
    decode_block_tables: torch.Tensor  # [Bd, max_blocks], padded with block 0 (masked)
    decode_context_lens: torch.Tensor  # [Bd]
    rope_lengths: list[tuple[int, int, int]]  # (start, end, sequence length) for length-dependent RoPE
    lora: Any = None  # a LoraBatch when any row uses an adapter
    attention_kernel: str = "torch"  # "triton": decode rows read the paged cache in attention_triton
    decode_mask: torch.Tensor | None = None  # [Bd, 1, 1, keys], made by the first layer, read by the others
    decode_tails: torch.Tensor | None = None  # flat [Bd * keys] indices past each row's length in its last block: zeroed when gathered

    def all_decode(self, tokens: int) -> bool:
        """Every token is a decoding row, in batch order: attention output needs no scatter."""
        return not self.prefills and self.decode_rows.shape[0] == tokens


def _window_mask(query_pos: torch.Tensor, key_pos: torch.Tensor, limit: torch.Tensor, window: int | None) -> torch.Tensor:
    visible = (key_pos <= query_pos) & (key_pos < limit)
    if window is not None:
        visible &= key_pos > query_pos - window
    return visible


def _unwritten_tails(lens: torch.Tensor, key_pos: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat indices, in a [rows * keys] gather, of the positions past each row's length within its last block."""
    last_block_end = (lens + block_size - 1) // block_size * block_size
    tails = (key_pos >= lens) & (key_pos < last_block_end)
    return tails.reshape(-1).nonzero().squeeze(1)


def _grouped_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """One query per row, as two batched matmuls with the softmax in float32.

    torch's CPU flash-attention kernel is ~5x slower in bfloat16 than this for one query row
    (1.1 vs 0.24 ms at 16 rows x 9 heads x 112 keys); in float32 it is the faster one, so it stays there.
    q: [B, heads, 1, d]; keys, values: [B, kv_heads, L, d]; mask: [B, 1, 1, L].
    """
    batch, heads, _, head_dim = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    grouped = q.view(batch, kv_heads, heads // kv_heads, head_dim)
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~mask.view(batch, 1, 1, length), float("-inf"))
    attended = torch.matmul(scores.softmax(-1).to(q.dtype), values)
    return attended.view(batch, heads, 1, head_dim)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: BatchMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """q: [T, heads, d]; k, v: [T, kv_heads, d] for the new tokens. Writes k, v into the cache."""
    num_blocks, block_size, kv_heads, head_dim = key_cache.shape
    key_cache.view(-1, kv_heads, head_dim)[meta.slot_mapping] = k
    value_cache.view(-1, kv_heads, head_dim)[meta.slot_mapping] = v
    out = torch.empty_like(q)
    for seg in meta.prefills:
        length = seg.context_len
        queries = q[seg.start : seg.end]
        q_len = queries.shape[0]
        if q_len == length:  # the first chunk: its own keys are all there is, no gather from the cache
            keys, values = k[seg.start : seg.end], v[seg.start : seg.end]
        else:
            keys = key_cache[seg.block_table].reshape(-1, kv_heads, head_dim)[:length]
            values = value_cache[seg.block_table].reshape(-1, kv_heads, head_dim)[:length]
        if q_len == length and (sliding_window is None or length <= sliding_window):
            mask, causal = None, True
        else:
            query_pos = torch.arange(length - q_len, length, device=q.device)[:, None]
            key_pos = torch.arange(length, device=q.device)[None, :]
            mask, causal = _window_mask(query_pos, key_pos, torch.tensor(length, device=q.device), sliding_window), False
        # 4-D inputs: with 3-D ones torch's CPU dispatch takes the math fallback, ~2x slower.
        attended = F.scaled_dot_product_attention(
            queries.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True,
        )
        out[seg.start : seg.end] = attended[0].transpose(0, 1)
    if meta.decode_rows.numel() and meta.attention_kernel == "triton":
        from lorafleet.server.model.attention_triton import paged_decode_attention

        attended = paged_decode_attention(q[meta.decode_rows], key_cache, value_cache, meta.decode_block_tables,
                                          meta.decode_context_lens, scale, sliding_window)
        if meta.all_decode(q.shape[0]):
            return attended
        out[meta.decode_rows] = attended
    elif meta.decode_rows.numel():
        batch = meta.decode_rows.shape[0]
        flat_tables = meta.decode_block_tables.reshape(-1)
        keys = key_cache.index_select(0, flat_tables).view(batch, -1, kv_heads, head_dim)
        values = value_cache.index_select(0, flat_tables).view(batch, -1, kv_heads, head_dim)
        if meta.decode_mask is None:  # the same for every layer
            lens = meta.decode_context_lens[:, None]
            key_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
            meta.decode_mask = _window_mask(lens - 1, key_pos, lens, sliding_window)[:, None, None, :]
            meta.decode_tails = _unwritten_tails(lens, key_pos, block_size)
        # The gathered copies are ours to change: positions of the last block that another sequence wrote.
        keys.view(-1, kv_heads, head_dim).index_fill_(0, meta.decode_tails, 0)
        values.view(-1, kv_heads, head_dim).index_fill_(0, meta.decode_tails, 0)
        keys, values = keys.transpose(1, 2), values.transpose(1, 2)
        mask = meta.decode_mask
        all_decode = meta.all_decode(q.shape[0])
        queries = (q if all_decode else q[meta.decode_rows]).unsqueeze(2)
        if q.device.type == "cpu" and q.dtype != torch.float32:
            attended = _grouped_decode_attention(queries, keys, values, mask, scale).squeeze(2)
        else:
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale, enable_gqa=True).squeeze(2)
        if all_decode:
            return attended  # rows are already in batch order
        out[meta.decode_rows] = attended
    return out
