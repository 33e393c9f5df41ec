"""Decode steps replayed from CUDA graphs, so the host launches one graph instead of ~20 kernels per layer.

A small model's decode step on a GPU is bound by the host: a Python loop dispatching each layer's
kernels takes milliseconds while the kernels take microseconds. As vLLM and nano-vllm do, a decode-only
step is captured once per batch-size bucket into a CUDA graph over static input buffers (token ids,
positions, cache slots, block tables, context lengths, each row's LoRA slot) and replayed after the
step's values are copied into those buffers. Prefill and mixed steps stay eager.

Rows past the step's size (a bucket is rounded up) write their keys and values into a scratch block
no sequence owns, attend to that one position and carry LoRA slot -1, which the Triton kernels skip;
their outputs are dropped. Adapter weights are read from the slot buffers at replay, so loading an
adapter into a slot needs no recapture.

Needs the Triton attention and LoRA kernels (the torch paths choose work on the host) and a RoPE
that does not depend on the sequence's length. On CPU there is nothing to capture: the same padded,
static-buffer forward runs eagerly, which is how the tests check everything but the capture itself.
The capture has not run on a GPU yet (bench/gpu_check.py times it when one is at hand).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet.server.lora.ops import LoraBatch
from lorafleet.server.model.attention import BatchMetadata
from lorafleet.server.model.kv import cache_slot

log = logging.getLogger(__name__)
BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


@dataclass(slots=True)
class DecodeRow:
    token: int
    position: int  # of the new token; the cache holds position + 1 tokens once it is written
    block_table: list[int]
    lora_slot: int  # -1: the base model


@dataclass(slots=True)
class _Bucket:
    size: int
    ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    tables: torch.Tensor
    lens: torch.Tensor
    lora_slots: torch.Tensor
    meta: BatchMetadata
    hidden: torch.Tensor | None = None
    graph: Any = None  # a torch.cuda.CUDAGraph; None replays eagerly (CPU)


class DecodeGraphs:
    def __init__(self, model: Any, kv: Any, scratch_block: int, block_size: int, max_rows: int, max_blocks_per_seq: int, capture: bool) -> None:
        self.model, self.kv = model, kv
        self.scratch_block, self.block_size = scratch_block, block_size
        self.buckets = [b for b in BUCKETS if b <= max_rows] or [1]
        self.width = max_blocks_per_seq
        self.capture = capture
        self.broken: str | None = None  # why a capture failed: the engine then runs every step eagerly
        self.replays = 0
        self._captured: dict[tuple[int, int | None], _Bucket] = {}
        self._pool: Any = None

    def bucket_for(self, rows: int) -> int | None:
        return next((b for b in self.buckets if b >= rows), None)

    def run(self, rows: list[DecodeRow], lora_slots: Any) -> torch.Tensor:
        """Hidden states of one decode-only step ([len(rows), hidden]); lora_slots: the LoraSlots, if any adapter was ever loaded."""
        size = self.bucket_for(len(rows))
        if size is None:
            raise ValueError(f"{len(rows)} rows exceed the largest captured bucket {self.buckets[-1]}")
        key = (size, id(lora_slots) if lora_slots is not None else None)
        bucket = self._captured.get(key)
        fresh = bucket is None
        if fresh:
            bucket = self._captured[key] = self._buffers(size, lora_slots)
        self._fill(bucket, rows)
        if fresh and self.capture:
            try:
                self._capture(bucket)
            except Exception as exc:  # noqa: BLE001 - a capture that fails must not take the replica down
                self.broken = f"{type(exc).__name__}: {exc}"
                log.exception("capturing the decode step for %d rows failed; decode runs eagerly from now on", size)
                bucket.graph = None
        if bucket.graph is not None:
            bucket.graph.replay()
        else:
            bucket.hidden = self._forward(bucket)
        self.replays += 1
        return bucket.hidden[: len(rows)]

    def _buffers(self, size: int, lora_slots: Any) -> _Bucket:
        device = self.model.device

        def longs(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.long, device=device)

        ids, positions, slot_mapping, lens = longs(size), longs(size), longs(size), longs(size)
        tables = longs(size, self.width)
        row_slots = torch.full((size,), -1, dtype=torch.int32, device=device)
        meta = BatchMetadata(slot_mapping=slot_mapping, prefills=[], decode_rows=torch.arange(size, device=device),
                             decode_block_tables=tables, decode_context_lens=lens, rope_lengths=[], attention_kernel="triton")
        if lora_slots is not None:
            from lorafleet.server.lora.triton_kernels import TritonMeta

            none = torch.zeros(0, dtype=torch.int32, device=device)
            rows = torch.arange(size, dtype=torch.int32, device=device)
            meta.lora = LoraBatch(slots=lora_slots, segments=[], groups=[], rows=none.long(), row_slots=none.long(),
                                  modules_used=set(lora_slots.a[0]), kernel="triton", rank=lora_slots.max_rank,
                                  triton_meta=TritonMeta(none, none, none, 0, rows, row_slots))
        return _Bucket(size, ids, positions, slot_mapping, tables, lens, row_slots, meta)

    def _fill(self, bucket: _Bucket, rows: list[DecodeRow]) -> None:
        """Copy this step's rows into the static buffers; the rest become scratch rows."""
        bs, pad = self.block_size, bucket.size - len(rows)
        scratch = self.scratch_block
        ids = [r.token for r in rows] + [0] * pad
        positions = [r.position for r in rows] + [0] * pad
        slots = [cache_slot(r.block_table, r.position, bs) for r in rows] + [scratch * bs] * pad
        tables = [r.block_table + [scratch] * (self.width - len(r.block_table)) for r in rows] + [[scratch] * self.width] * pad
        lens = [r.position + 1 for r in rows] + [1] * pad
        lora = [r.lora_slot for r in rows] + [-1] * pad
        for buffer, values in ((bucket.ids, ids), (bucket.positions, positions), (bucket.slot_mapping, slots),
                               (bucket.tables, tables), (bucket.lens, lens), (bucket.lora_slots, lora)):
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype), non_blocking=True)

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        return self.model.forward(bucket.ids, bucket.positions, bucket.meta, self.kv)

    def _capture(self, bucket: _Bucket) -> None:
        """Warm up on a side stream (Triton compiles its kernels there), then capture into the shared pool.

        The warm-up writes this step's real keys and values into their real slots: the same values
        the replay writes again, so it changes nothing.
        """
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._forward(bucket)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            bucket.hidden = self._forward(bucket)
        self._pool = graph.pool()
        bucket.graph = graph
        log.info("captured the decode step for %d rows in a CUDA graph", bucket.size)
