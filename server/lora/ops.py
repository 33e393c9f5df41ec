"""The batched LoRA op: y += (x·A_i)·B_i, where i is each row's slot, for one projection of one layer.

``LoraBatch`` is built once per step from each sequence's slot and token count and then serves
every projection of every layer. Two implementations sit behind ``add``:

- torch (the reference and the CPU path): rows of the few adapters that fill most of a batch are
  grouped, one matmul pair per adapter; single decode rows of many adapters are one bmm pair over
  their slots in place (rows sorted by slot), or, when those slots are scattered, over a gather of
  each row's A and B (BGMV); prefill chunks are segments, one matmul pair each (SGMV).
- triton (cuda): the same segments and rows through the kernels in ``triton_kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

GROUP_LIMIT = 4  # at most this many distinct adapters among decode rows: one matmul pair per adapter
VIEW_CACHE_LIMIT = 1 << 16  # cached slot views, ~400 bytes each (a step uses one per adapter, projection and layer)


class SlotBuffers:
    """What a LoraBatch reads: per layer and projection one A [slots, in, r_max] and one B [slots, r_max, out].

    ``LoraSlots`` fills them with adapters; tests and the GPU check build them directly.
    """

    def __init__(self, a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]], kernel: str, max_rank: int) -> None:
        self.a, self.b, self.kernel, self.max_rank = a, b, kernel, max_rank
        # Which modules each slot touches, so a batch skips projections no resident row adapts.
        self.modules_of_slot: dict[int, set[str]] = {}
        self.rank_of_slot: dict[int, int] = {}  # the torch path multiplies only up to the batch's largest rank
        # Rank-sliced views of the buffers, made once: a view costs a few µs of dispatch, and a decode step
        # asks for one per projection per layer. The buffers are never reallocated, so a view never goes stale;
        # the keys (rank, slot or span of slots) vary with traffic, so the cache is emptied at VIEW_CACHE_LIMIT.
        self._views: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def view(self, layer: int, module: str, rank: int, which: int | tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A [in, rank] and B [rank, out] of slot ``which``; of slots start..stop-1 for a tuple, of all for None."""
        key = (layer, module, rank, which)
        found = self._views.get(key)
        if found is None:
            a, b = self.a[layer][module][:, :, :rank], self.b[layer][module][:, :rank]
            if isinstance(which, int):
                a, b = a[which], b[which]
            elif which is not None:
                a, b = a[which[0]: which[1]], b[which[0]: which[1]]
            if len(self._views) >= VIEW_CACHE_LIMIT:
                self._views.clear()
            found = self._views[key] = (a, b)
        return found


@dataclass(slots=True)
class LoraBatch:
    slots: SlotBuffers
    segments: list[tuple[int, int, int]]  # (start, end, slot) of multi-token chunks
    groups: list[tuple[torch.Tensor | slice, int]]  # (rows, slot) of decode rows grouped by adapter; a slice when contiguous
    rows: torch.Tensor  # decode rows gathered per token (when adapters are many)
    row_slots: torch.Tensor
    modules_used: set[str]
    kernel: str
    row_range: slice | None = None  # the decode rows as a slice, when they are contiguous (all-decode steps)
    # When the rows' slots are a dense range: (first slot, number of slots, rows per slot), and each row's
    # place in the [slots × rows per slot] block when padded. Then bmm reads the slots in place, no gather.
    span: tuple[int, int, int] | None = None
    positions: torch.Tensor | None = None
    # With a span over contiguous rows: each row's place in that block, in row order (None when it is the
    # identity), so the delta goes back with one index_select and an add, not index_add_ (~5x slower here).
    back: torch.Tensor | None = None
    triton_meta: Any = None
    rank: int = 0  # the largest rank among this batch's adapters: the torch path slices the padded buffers to it

    @classmethod
    def build(cls, slots: SlotBuffers, seq_slots: list[int], seq_tokens: list[int]) -> LoraBatch:
        segments: list[tuple[int, int, int]] = []
        decode: dict[int, list[int]] = {}
        start = 0
        for slot, count in zip(seq_slots, seq_tokens):
            if slot >= 0:
                if count == 1:
                    decode.setdefault(slot, []).append(start)
                elif segments and segments[-1][1] == start and segments[-1][2] == slot:
                    # Adjacent chunks on one adapter are one matmul pair: 16 prompts on one adapter cost 1, not 16.
                    segments[-1] = (segments[-1][0], start + count, slot)
                else:
                    segments.append((start, start + count, slot))
            start += count
        device = slots.a[0][next(iter(slots.a[0]))].device
        in_batch = {s for s in seq_slots if s >= 0}
        used = set().union(*(slots.modules_of_slot.get(s, set()) for s in in_batch))
        groups: list[tuple[torch.Tensor | slice, int]] = []
        span, places = None, []
        rows: list[int] = []
        row_slots: list[int] = []
        if len(decode) <= GROUP_LIMIT:
            # A contiguous group (one adapter's rows side by side, e.g. a batch on one adapter) is a view: no gather, no index_put.
            groups = [(slice(r[0], r[-1] + 1) if r[-1] - r[0] == len(r) - 1 else torch.tensor(r, dtype=torch.long, device=device), s)
                      for s, r in decode.items()]
        else:
            first, last, per = min(decode), max(decode), max(len(r) for r in decode.values())
            if last - first + 1 <= 2 * len(decode):  # at most half the spanned slots unused: reading them in place wins
                span = (first, last - first + 1, per)
                rows = [row for s in sorted(decode) for row in decode[s]]
                places = [(s - first) * per + k for s in sorted(decode) for k in range(len(decode[s]))]
            else:
                pairs = sorted((row, s) for s, r in decode.items() for row in r)
                rows = [row for row, _ in pairs]
                row_slots = [s for _, s in pairs]
        batch = cls(
            slots=slots,
            segments=segments,
            groups=groups,
            rows=torch.tensor(rows, dtype=torch.long, device=device),
            row_slots=torch.tensor(row_slots, dtype=torch.long, device=device),
            modules_used=used,
            kernel=slots.kernel,
            rank=max((slots.rank_of_slot.get(s, slots.max_rank) for s in in_batch), default=slots.max_rank),
        )
        if span is not None:
            batch.span = span
            padded = span[1] * span[2] != len(rows)
            if padded:
                batch.positions = torch.tensor(places, dtype=torch.long, device=device)
            by_row = sorted(range(len(rows)), key=rows.__getitem__)
            if rows[by_row[-1]] - rows[by_row[0]] == len(rows) - 1:
                batch.row_range = slice(rows[by_row[0]], rows[by_row[0]] + len(rows))
                back = [places[i] for i in by_row]
                if padded or back != list(range(len(rows))):
                    batch.back = torch.tensor(back, dtype=torch.long, device=device)
        elif rows and rows == list(range(rows[0], rows[0] + len(rows))):
            batch.row_range = slice(rows[0], rows[0] + len(rows))
        if batch.kernel == "triton":
            from lorafleet.server.lora import triton_kernels as lora_triton

            batch.triton_meta = lora_triton.TritonMeta.build(seq_slots, seq_tokens, device)
        return batch

    def add(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        """y (a view of the projection's output) += this batch's LoRA delta for (layer, module)."""
        if module not in self.modules_used:
            return
        if self.kernel == "triton":
            from lorafleet.server.lora import triton_kernels as lora_triton

            lora_triton.lora_add(x, y, self.slots.a[layer][module], self.slots.b[layer][module], self.triton_meta)
            return
        # Slots are padded to --max-lora-rank (64 by default): the torch path multiplies only up to the batch's rank.
        lora_add_torch(x, y, layer, module, self)


def lora_add_torch(x: torch.Tensor, y: torch.Tensor, layer: int, module: str, batch: LoraBatch) -> None:
    # Per adapter: y += (x·A)·B as mm and addmm_, on views made once; a decode step runs this up to
    # 7 × layers times, so each dispatch saved (an indexing view, a separate add) is ~5 µs × hundreds.
    view = batch.slots.view
    # Slots may be float32 under a bfloat16 model. Prefill chunks (many rows) multiply in the model's dtype, which
    # has the fast units (AMX), converting the one adapter's A and B; decode rows (few rows, where torch's bf16
    # matmuls run at half the float32 speed here) are widened to float32 and their delta narrowed as it is added.
    slot_dtype = batch.slots.a[layer][module].dtype
    widened = x.dtype != slot_dtype  # checked once: a no-op .to() still costs ~3 µs, 210 times a step
    for start, end, slot in batch.segments:
        a, b = view(layer, module, batch.rank, slot)
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        # MKL's sgemm is slow for a many-row x times an A under 16 columns (1024x576 by 576x8: 350 µs); the
        # transposed product (A^T x^T)^T is the same sums at 120 µs. At rank 16 and up the plain form wins.
        shrunk = torch.mm(a.t(), x[start:end].t()).t() if batch.rank < 16 and end - start >= 64 else torch.mm(x[start:end], a)
        add_product(y[start:end], shrunk, b)
    for rows, slot in batch.groups:
        a, b = view(layer, module, batch.rank, slot)
        xs = x[rows].to(slot_dtype) if widened else x[rows]
        if isinstance(rows, slice):
            add_product(y[rows], torch.mm(xs, a), b)
        else:
            y.index_add_(0, rows, (torch.mm(xs, a) @ b).to(y.dtype))
    if batch.span is not None:
        # Rows sorted by slot over a dense range of slots: one bmm pair reads each adapter in place, once.
        first, count, per = batch.span
        a, b = view(layer, module, batch.rank, (first, first + count))
        in_order = batch.row_range is not None and batch.back is None  # rows already in slot order, unpadded
        xs = x[batch.row_range] if in_order else x.index_select(0, batch.rows)
        xs = xs.to(slot_dtype) if widened else xs
        if batch.positions is not None:  # some slots have fewer rows than others, or none: zero rows pad them
            xs = xs.new_zeros(count * per, x.shape[1]).index_copy_(0, batch.positions, xs)
        delta = torch.bmm(torch.bmm(xs.view(count, per, -1), a), b).view(count * per, -1)
        if batch.row_range is not None:
            y[batch.row_range] += delta if batch.back is None else delta.index_select(0, batch.back)
        else:
            y.index_add_(0, batch.rows, (delta if batch.positions is None else delta.index_select(0, batch.positions)).to(y.dtype))
    elif batch.rows.numel():
        # Slots scattered over a wide range (reading the range in place would read more unused slots than
        # used ones): index_select copies each row's adapter once, and that copy is most of the cost.
        a, b = view(layer, module, batch.rank)
        rows = batch.row_range if batch.row_range is not None else batch.rows
        xs = x[rows].to(slot_dtype) if widened else x[rows]
        shrunk = torch.bmm(xs.unsqueeze(1), a.index_select(0, batch.row_slots))
        delta = torch.bmm(shrunk, b.index_select(0, batch.row_slots)).squeeze(1)
        if batch.row_range is not None:
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta.to(y.dtype))


def add_product(y: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> None:
    """y += s·b, fused into one addmm_ when the dtypes agree."""
    if y.dtype == b.dtype:
        y.addmm_(s, b)
    else:
        y += torch.mm(s, b)


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """The plainest statement of the op, one token at a time: what every path is tested against."""
    out = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float32, device=x.device)
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            out[t] = (x[t].float() @ a[slot].float()) @ b[slot].float()
    return out
