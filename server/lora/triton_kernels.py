"""Triton kernels for the batched LoRA op (cuda; checked on CPU with TRITON_INTERPRET=1).

Two shapes of work, as in Punica and vLLM's lora_shrink / lora_expand:
- SGMV for prefill: a segment is one sequence's chunk, all rows on one adapter; a program takes a
  tile of the segment's rows and multiplies it with that adapter's A (shrink, to rank) or B
  (expand, back to the projection's width, added into the output in place) with ``tl.dot``.
- BGMV for decode: one row per sequence, each on its own adapter; a program takes one row and a
  tile of the output, with a broadcasted multiply and a sum (a 1-row ``tl.dot`` would waste 15/16
  of the tensor core).
The shrink result stays in float32 between the two kernels; the output view may be strided (a
slice of the fused q/k/v or gate/up output), so every stride is passed explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(slots=True)
class TritonMeta:
    seg_start: torch.Tensor
    seg_len: torch.Tensor
    seg_slot: torch.Tensor
    max_seg_len: int
    tok_rows: torch.Tensor
    tok_slots: torch.Tensor

    @classmethod
    def build(cls, seq_slots: list[int], seq_tokens: list[int], device: torch.device) -> TritonMeta:
        starts, lens, slots, rows, row_slots = [], [], [], [], []
        offset = 0
        for slot, count in zip(seq_slots, seq_tokens):
            if slot >= 0:
                if count == 1:
                    rows.append(offset)
                    row_slots.append(slot)
                else:
                    starts.append(offset)
                    lens.append(count)
                    slots.append(slot)
            offset += count

        def ints(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int32, device=device)

        return cls(ints(starts), ints(lens), ints(slots), max(lens, default=0), ints(rows), ints(row_slots))


@triton.jit
def _sgmv_shrink(x_ptr, a_ptr, out_ptr, seg_start, seg_len, seg_slot, K, R,
                 sxm, sxk, sas, sak, sar, som, sor,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    start = tl.load(seg_start + seg)
    length = tl.load(seg_len + seg)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < length
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xs = tl.load(x_ptr + (start + offs_m)[:, None] * sxm + offs_k[None, :] * sxk,
                     mask=row_ok[:, None] & (offs_k[None, :] < K), other=0.0)
        as_ = tl.load(a_ptr + slot * sas + offs_k[:, None] * sak + offs_r[None, :] * sar,
                      mask=(offs_k[:, None] < K) & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            xs = xs.to(tl.float32)
            as_ = as_.to(tl.float32)
        acc += tl.dot(xs, as_, input_precision=PRECISION)
    tl.store(out_ptr + (start + offs_m)[:, None] * som + offs_r[None, :] * sor, acc,
             mask=row_ok[:, None] & (offs_r[None, :] < R))


@triton.jit
def _sgmv_expand(t_ptr, b_ptr, y_ptr, seg_start, seg_len, seg_slot, R, N,
                 stm, str_, sbs, sbr, sbn, sym, syn,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                 UPCAST: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_start + seg)
    length = tl.load(seg_len + seg)
    slot = tl.load(seg_slot + seg).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    row_ok = offs_m < length
    ts = tl.load(t_ptr + (start + offs_m)[:, None] * stm + offs_r[None, :] * str_,
                 mask=row_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    bs = tl.load(b_ptr + slot * sbs + offs_r[:, None] * sbr + offs_n[None, :] * sbn,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < N), other=0.0)
    if UPCAST:
        acc = tl.dot(ts, bs.to(tl.float32), input_precision=PRECISION)
    else:
        acc = tl.dot(ts.to(bs.dtype), bs, input_precision=PRECISION)
    y_ptrs = y_ptr + (start + offs_m)[:, None] * sym + offs_n[None, :] * syn
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    ys = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (ys.to(tl.float32) + acc).to(ys.dtype), mask=mask)


@triton.jit
def _bgmv_shrink(x_ptr, a_ptr, out_ptr, rows, slots, K, R,
                 sxm, sxk, sas, sak, sar, som, sor,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    row = tl.load(rows + pid).to(tl.int64)
    slot = tl.load(slots + pid).to(tl.int64)
    # A row on slot -1 (the base model: CUDA graphs pass every row of a bucket) reads and adds nothing.
    rank_limit = tl.where(slot >= 0, R, 0)
    slot = tl.maximum(slot, 0)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xs = tl.load(x_ptr + row * sxm + offs_k * sxk, mask=offs_k < K, other=0.0).to(tl.float32)
        as_ = tl.load(a_ptr + slot * sas + offs_k[:, None] * sak + offs_r[None, :] * sar,
                      mask=(offs_k[:, None] < K) & (offs_r[None, :] < rank_limit), other=0.0).to(tl.float32)
        acc += tl.sum(xs[:, None] * as_, axis=0)
    tl.store(out_ptr + row * som + offs_r * sor, acc, mask=offs_r < R)


@triton.jit
def _bgmv_expand(t_ptr, b_ptr, y_ptr, rows, slots, R, N,
                 stm, str_, sbs, sbr, sbn, sym, syn,
                 BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    row = tl.load(rows + pid).to(tl.int64)
    slot = tl.load(slots + pid).to(tl.int64)
    out_limit = tl.where(slot >= 0, N, 0)  # slot -1: nothing is written
    slot = tl.maximum(slot, 0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ts = tl.load(t_ptr + row * stm + offs_r * str_, mask=offs_r < R, other=0.0)
    bs = tl.load(b_ptr + slot * sbs + offs_r[:, None] * sbr + offs_n[None, :] * sbn,
                 mask=(offs_r[:, None] < R) & (offs_n[None, :] < out_limit), other=0.0).to(tl.float32)
    acc = tl.sum(ts[:, None] * bs, axis=0)
    y_ptrs = y_ptr + row * sym + offs_n * syn
    ys = tl.load(y_ptrs, mask=offs_n < out_limit, other=0.0)
    tl.store(y_ptrs, (ys.to(tl.float32) + acc).to(ys.dtype), mask=offs_n < out_limit)


def lora_add(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, meta: TritonMeta) -> None:
    """y[rows of each slot] += (x·A[slot])·B[slot]; a: [slots, in, r], b: [slots, r, out]."""
    tokens, k = x.shape
    rank, n = b.shape[1], b.shape[2]
    block_r = max(16, triton.next_power_of_2(rank))
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    # Triton's CPU interpreter multiplies bfloat16 tiles wrongly (numpy has no bfloat16), so under
    # the interpreter the bf16 tiles are widened before tl.dot; on a GPU they go to the tensor cores.
    upcast = x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1"
    shrunk = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    if meta.seg_start.numel():
        block_m = 16
        grid_m = triton.cdiv(meta.max_seg_len, block_m)
        _sgmv_shrink[(meta.seg_start.numel(), grid_m)](
            x, a, shrunk, meta.seg_start, meta.seg_len, meta.seg_slot, k, rank,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), shrunk.stride(0), shrunk.stride(1),
            BLOCK_M=block_m, BLOCK_K=32, BLOCK_R=block_r, PRECISION=precision, UPCAST=upcast)
        _sgmv_expand[(meta.seg_start.numel(), grid_m, triton.cdiv(n, 64))](
            shrunk, b, y, meta.seg_start, meta.seg_len, meta.seg_slot, rank, n,
            shrunk.stride(0), shrunk.stride(1), b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
            BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=block_r, PRECISION=precision, UPCAST=upcast)
    if meta.tok_rows.numel():
        _bgmv_shrink[(meta.tok_rows.numel(),)](
            x, a, shrunk, meta.tok_rows, meta.tok_slots, k, rank,
            x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), shrunk.stride(0), shrunk.stride(1),
            BLOCK_K=64, BLOCK_R=block_r)
        _bgmv_expand[(meta.tok_rows.numel(), triton.cdiv(n, 128))](
            shrunk, b, y, meta.tok_rows, meta.tok_slots, rank, n,
            shrunk.stride(0), shrunk.stride(1), b.stride(0), b.stride(1), b.stride(2), y.stride(0), y.stride(1),
            BLOCK_N=128, BLOCK_R=block_r)
