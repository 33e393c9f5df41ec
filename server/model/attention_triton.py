"""A Triton paged-attention kernel for decode steps (cuda; checked on CPU with TRITON_INTERPRET=1).

One program per (sequence, kv head): it walks the sequence's block table, scores every query
head of that kv group against each cached block of keys, and keeps a running (online) softmax so
the whole context is read once, straight from the paged cache — no gather into a padded copy as
the torch path does. Prefill chunks stay on the torch path (SDPA), which is already efficient.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale, window,
                  sq_t, sq_h, sk_b, sk_s, sk_h, so_t, so_h, st_b,
                  GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HAS_WINDOW: tl.constexpr):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    heads = kv_head * GROUP + tl.arange(0, GROUP_PAD)
    head_ok = tl.arange(0, GROUP_PAD) < GROUP
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(q_ptr + seq * sq_t + heads[:, None] * sq_h + dims[None, :], mask=head_ok[:, None], other=0.0).to(tl.float32)
    m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
    denom = tl.zeros((GROUP_PAD,), dtype=tl.float32)
    acc = tl.zeros((GROUP_PAD, HEAD_DIM), dtype=tl.float32)
    offsets = tl.arange(0, BLOCK)
    num_blocks = tl.cdiv(length, BLOCK)
    for b in range(0, num_blocks):
        block = tl.load(tables_ptr + seq * st_b + b).to(tl.int64)
        positions = b * BLOCK + offsets
        visible = positions < length
        if HAS_WINDOW:
            visible = visible & (positions > length - 1 - window)
        base = block * sk_b + kv_head * sk_h
        k = tl.load(k_ptr + base + offsets[:, None] * sk_s + dims[None, :], mask=visible[:, None], other=0.0).to(tl.float32)
        v = tl.load(v_ptr + base + offsets[:, None] * sk_s + dims[None, :], mask=visible[:, None], other=0.0).to(tl.float32)
        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, BLOCK]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block wholly outside the window
        correction = tl.exp(m - m_safe)
        p = tl.exp(scores - m_safe[:, None])
        denom = denom * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / denom[:, None]
    tl.store(out_ptr + seq * so_t + heads[:, None] * so_h + dims[None, :], out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None])


def paged_decode_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                           context_lens: torch.Tensor, scale: float, sliding_window: int | None) -> torch.Tensor:
    """q: [B, heads, d] (one token per sequence); caches: [blocks, block_size, kv_heads, d]. Returns [B, heads, d]."""
    batch, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = key_cache.shape
    group = heads // kv_heads
    out = torch.empty_like(q)
    _paged_decode[(batch, kv_heads)](
        q, key_cache, value_cache, out, block_tables, context_lens, scale, sliding_window or 0,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(2, triton.next_power_of_2(group)), BLOCK=block_size, HEAD_DIM=head_dim,
        HAS_WINDOW=sliding_window is not None,
    )
    return out
