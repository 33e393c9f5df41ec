"""The batched LoRA op: y += (x·A_i)·B_i, where i is each row's slot, for one projection of one layer.

``LoraBatch`` is built once per step from each sequence's slot and token count and then serves
every projection of every layer. Two implementations sit behind ``add``:

- torch (the reference and the CPU path): rows of the few adapters that fill most of a batch are
  grouped, one matmul pair per adapter; single decode rows of many adapters are gathered and
  multiplied with one bmm (BGMV); prefill chunks are segments, one matmul pair each (SGMV).
- triton (cuda): the same segments and rows through the kernels in ``triton_kernels``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

GROUP_LIMIT = 4  # at most this many distinct adapters among decode rows: one matmul pair per adapter


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
        # asks for one per projection per layer. The buffers are never reallocated, so a view never goes stale.
        self._views: dict[tuple[int, str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def view(self, layer: int, module: str, slot: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A [in, rank] and B [rank, out] of one slot, or of every slot ([slots, ...]) for slot -1."""
        key = (layer, module, slot, rank)
        found = self._views.get(key)
        if found is None:
            a, b = self.a[layer][module][:, :, :rank], self.b[layer][module][:, :rank]
            found = self._views[key] = (a, b) if slot < 0 else (a[slot], b[slot])
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
    row_range: slice | None = None  # the gathered rows as a slice, when they are contiguous (all-decode steps)
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
        rows: list[int] = []
        row_slots: list[int] = []
        if len(decode) <= GROUP_LIMIT:
            # A contiguous group (one adapter's rows side by side, e.g. a batch on one adapter) is a view: no gather, no index_put.
            groups = [(slice(r[0], r[-1] + 1) if r[-1] - r[0] == len(r) - 1 else torch.tensor(r, dtype=torch.long, device=device), s)
                      for s, r in decode.items()]
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
        if rows and rows == list(range(rows[0], rows[0] + len(rows))):
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
    for start, end, slot in batch.segments:
        a, b = view(layer, module, slot, batch.rank)
        y[start:end].addmm_(torch.mm(x[start:end], a), b)
    for rows, slot in batch.groups:
        a, b = view(layer, module, slot, batch.rank)
        if isinstance(rows, slice):
            y[rows].addmm_(torch.mm(x[rows], a), b)
        else:
            y.index_add_(0, rows, torch.mm(x[rows], a) @ b)
    if batch.rows.numel():
        # index_select copies each row's adapter once, multi-threaded; that copy is most of the cost.
        # Measured against one bmm over the slots in place (rows sorted and padded by slot): no faster at
        # rank 16 (35 vs 37 ms per SmolLM2 step, 32 rows on 32 adapters), far slower on rank-sliced views.
        a, b = view(layer, module, -1, batch.rank)
        rows = batch.row_range if batch.row_range is not None else batch.rows
        shrunk = torch.bmm(x[rows].unsqueeze(1), a.index_select(0, batch.row_slots))
        delta = torch.bmm(shrunk, b.index_select(0, batch.row_slots)).squeeze(1)
        if batch.row_range is not None:
            y[rows] += delta
        else:
            y.index_add_(0, rows, delta)


def lora_reference(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
    """The plainest statement of the op, one token at a time: what every path is tested against."""
    out = torch.zeros(x.shape[0], b.shape[-1], dtype=torch.float32, device=x.device)
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            out[t] = (x[t].float() @ a[slot].float()) @ b[slot].float()
    return out
