"""The model runner: everything about running the model, and nothing about which requests run.

It picks the dtype and the kernels, loads the weights, sizes the KV cache (how many blocks the budget holds) and
the adapter slots, turns a step's scheduled chunks into the batch's tensors, and runs the forward pass, eagerly or
through a captured CUDA graph. The engine (engine.py) decides what runs; the output processor (output.py) decides
what the results mean. nano-vllm's ModelRunner and vLLM's GPU model runner have the same job.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorafleet.server.config import EngineConfig
from lorafleet.server.engine.decode_graphs import DecodeGraphs, DecodeRow
from lorafleet.server.engine.scheduler import ScheduledChunk
from lorafleet.server.lora.adapter_format import LoraAdapter, load_adapter
from lorafleet.server.lora.slots import LoraSlots, bytes_per_slot
from lorafleet.server.model.attention import BatchMetadata, PrefillSegment
from lorafleet.server.model.checkpoint import load_weights, read_config
from lorafleet.server.model.kv import KVCache, cache_slot
from lorafleet.server.model.linear import resolve_linear_kernel
from lorafleet.server.model.model import CausalLM
from lorafleet.server.model.prequantized import packed_format

log = logging.getLogger(__name__)
DEFAULT_CPU_KV_BYTES = 1 << 30


def cpu_probe(name: str) -> bool:
    return bool(getattr(torch.cpu, name, lambda: False)())


def cpu_auto_dtype() -> tuple[torch.dtype, str]:
    """(dtype, why) for ``--dtype auto`` on this CPU. bfloat16 only with AMX, whose tiles run oneDNN's bfloat16 GEMM
    several times faster than float32. AVX512-BF16 alone is not enough: on a 2-core Zen 4 without AMX, SmolLM2 served
    bfloat16 at 0.83x float32's tokens/s (125 vs 150 base, 120 vs 131 with 32 adapters), and its greedy answers drift
    from float32's."""
    if cpu_probe("_is_amx_tile_supported"):
        return torch.bfloat16, "the CPU has AMX tiles: bfloat16 GEMMs run several times faster than float32"
    if cpu_probe("_is_avx512_bf16_supported"):
        return torch.float32, "the CPU has AVX512-BF16 but no AMX: bfloat16 measured 0.83x float32 there (and drifts from its answers)"
    return torch.float32, "the CPU has no bfloat16 units"


def resolve_dtype(name: str, device: torch.device, checkpoint_dtype: str | None) -> tuple[torch.dtype, str]:
    """(dtype, why). auto: on cpu by what the CPU has (cpu_auto_dtype), on cuda the checkpoint's."""
    if name == "auto":
        if device.type == "cpu":
            return cpu_auto_dtype()
        name, why = checkpoint_dtype or "bfloat16", f"the checkpoint's dtype ({checkpoint_dtype})" if checkpoint_dtype else "the checkpoint names none"
    else:
        why = "--dtype"
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
    return table[name], why


def resolve_kernel(choice: str, device: torch.device) -> str:
    """auto: the Triton kernels on cuda, the torch path elsewhere."""
    return ("triton" if device.type == "cuda" else "torch") if choice == "auto" else choice


class ModelRunner:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        folder = Path(config.model)
        self.device = torch.device(config.device)
        self.model_config = read_config(folder)
        raw_dtype = self.model_config.raw.get("torch_dtype") or self.model_config.raw.get("dtype")
        self.dtype, self.dtype_reason = resolve_dtype(config.dtype, self.device, raw_dtype)
        log.info("dtype %s: %s", str(self.dtype).removeprefix("torch."), self.dtype_reason)
        self.linear_kernel = resolve_linear_kernel(config.linear_kernel, self.device, self.dtype)
        self.packed_format = packed_format(self.model_config.raw.get("quantization_config"), config.quantize)
        self.model = CausalLM(folder, self.model_config, load_weights(folder, config.allow_pickle), self.dtype, self.device, self.linear_kernel,
                              config.quantize, config.quantize_group_size, self.packed_format)
        self.attention_kernel = resolve_kernel(config.attention_kernel, self.device)
        self.lora_kernel = resolve_kernel(config.lora_kernel, self.device)
        self.num_blocks = self._size_kv()
        # Two blocks more than the allocator hands out: the scratch block padded CUDA-graph rows write into, and
        # the null block that pads decode block tables. Nothing writes the null block, so it stays zero: padding
        # never reads what another sequence left (server/model/attention.py, "Isolation").
        self.kv = KVCache(self.model_config, self.num_blocks + 2, config.block_size, self.dtype, self.device)
        self.null_block = self.num_blocks + 1
        self.shapes, self.layers = self.model.module_shapes(), self.model_config.num_layers
        # On CPU the torch path keeps slots in float32 whatever the model's dtype: decode rows multiply in float32
        # (torch's bf16 matmuls at LoRA's few-row shapes run at half the float32 speed here), prefill chunks narrow
        # their adapter to the model's dtype (many rows: the bf16 units win). A slot is small next to the base model.
        self.slot_dtype = torch.float32 if self.device.type == "cpu" and self.lora_kernel == "torch" else self.dtype
        self.num_slots = self._size_slots()
        self.decode_graphs = self._decode_graphs(scratch_block=self.num_blocks)

    # -- sizing ---------------------------------------------------------------------------------

    def _size_kv(self) -> int:
        config = self.config
        block_bytes = KVCache.bytes_per_block(self.model_config, config.block_size, self.dtype)
        budget = config.kv_cache_memory
        if budget is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = int(free * config.kv_cache_fraction)
            else:
                budget = DEFAULT_CPU_KV_BYTES
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory {budget} bytes holds no block ({block_bytes} bytes each)")
        self.kv_cache_bytes = num_blocks * block_bytes
        return num_blocks

    def _size_slots(self) -> int:
        config = self.config
        if config.adapter_memory is None:
            return config.max_active_adapters
        per_slot = bytes_per_slot(self.shapes, self.layers, config.max_lora_rank, self.slot_dtype)
        if config.adapter_memory // per_slot < 1:
            raise ValueError(f"--adapter-memory {config.adapter_memory} bytes holds no adapter slot "
                             f"({per_slot} bytes each at --max-lora-rank {config.max_lora_rank})")
        return config.adapter_memory // per_slot

    def make_slots(self) -> LoraSlots:
        """Made on the first adapter load: slots cost memory a base-only replica never uses."""
        return LoraSlots(self.shapes, self.layers, self.num_slots, self.config.max_lora_rank, self.slot_dtype, self.device, self.lora_kernel)

    def parse_adapter(self, name: str, folder: Path) -> LoraAdapter:
        """A PEFT folder checked against this model; on cuda its tensors page-locked, so the copy into a slot is asynchronous."""
        adapter = load_adapter(name, Path(folder), self.shapes, self.layers, self.config.max_lora_rank, self.config.allow_pickle)
        if self.device.type == "cuda":
            adapter.weights = {k: (a.pin_memory(), b.pin_memory()) for k, (a, b) in adapter.weights.items()}
        return adapter

    def _decode_graphs(self, scratch_block: int) -> DecodeGraphs | None:
        """auto: on cuda when every kernel a decode step runs can be captured; "on" elsewhere runs the same path eagerly."""
        choice = self.config.cuda_graphs
        capturable = (self.attention_kernel == "triton" and self.lora_kernel == "triton" and not self.model.rope.length_dependent
                      and not self.model.is_moe)  # the experts' loop depends on the routing: not capturable
        if choice == "off" or (choice == "auto" and (self.device.type != "cuda" or not capturable)):
            return None
        if not capturable:
            raise ValueError("cuda_graphs on needs the Triton attention and LoRA kernels, a RoPE that does not depend on length and a dense MLP "
                             f"(attention {self.attention_kernel}, lora {self.lora_kernel}, rope {self.model.rope.rope_type}, experts {self.model_config.num_experts})")
        c = self.config
        return DecodeGraphs(self.model, self.kv, scratch_block, c.block_size, min(c.max_running_requests, 256),
                            -(-c.max_total_tokens // c.block_size), capture=self.device.type == "cuda")

    # -- a step ---------------------------------------------------------------------------------

    def run(self, chunks: list[ScheduledChunk], slots: LoraSlots | None) -> torch.Tensor:
        """The hidden states of every scheduled token, in chunk order."""
        if self._graphable(chunks):
            rows = [DecodeRow(token, c.seq.num_computed + i, c.seq.block_table, slots.slot_of[c.seq.adapter] if c.seq.adapter is not None else -1)
                    for c in chunks for i, token in enumerate([c.seq.token_ids[c.seq.num_computed], *c.draft])]
            return self.decode_graphs.run(rows, slots)
        input_ids, positions, meta = self.prepare(chunks, slots)
        return self.model.forward(input_ids, positions, meta, self.kv)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def _graphable(self, chunks: list[ScheduledChunk]) -> bool:
        """A decode-only step (speculative verify rows are decode rows too) that fits a bucket; prefill chunks and bigger
        batches run eagerly."""
        graphs = self.decode_graphs
        fits = graphs is not None and graphs.broken is None and graphs.bucket_for(sum(c.width for c in chunks)) is not None
        return fits and all(c.num_tokens == 1 and c.seq.num_computed > 0 for c in chunks)

    def prepare(self, chunks: list[ScheduledChunk], slots: LoraSlots | None) -> tuple[torch.Tensor, torch.Tensor, BatchMetadata]:
        ids: list[int] = []
        positions: list[int] = []
        cache_slots: list[int] = []
        prefills: list[PrefillSegment] = []
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        rope_lengths: list[tuple[int, int, int]] = []
        bs, device = self.config.block_size, self.device
        for chunk in chunks:
            seq, start = chunk.seq, len(ids)
            # a verify chunk is its last token and the proposals after it, at the positions they would take
            first, last = seq.num_computed, seq.num_computed + chunk.width
            ids.extend(seq.token_ids[first:first + chunk.num_tokens])
            ids.extend(chunk.draft)
            positions.extend(range(first, last))
            cache_slots.extend(cache_slot(seq.block_table, p, bs) for p in range(first, last))
            rope_lengths.append((start, len(ids), last))
            if chunk.num_tokens == 1 and first > 0:
                # A decode row; a verify chunk's proposals are decode rows too, each seeing the cache up to itself (all
                # of the step's keys and values are written before any row attends): one batched attention call.
                for i in range(chunk.width):
                    decode_rows.append(start + i)
                    decode_tables.append(seq.block_table)
                    decode_lens.append(first + i + 1)
            else:
                table = torch.tensor(seq.block_table[: -(-last // bs)], dtype=torch.long, device=device)
                prefills.append(PrefillSegment(start, len(ids), last, table))
        width = max((len(t) for t in decode_tables), default=0)
        meta = BatchMetadata(
            slot_mapping=torch.tensor(cache_slots, dtype=torch.long, device=device),
            prefills=prefills,
            decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=device),
            decode_block_tables=torch.tensor([t + [self.null_block] * (width - len(t)) for t in decode_tables],
                                             dtype=torch.long, device=device).reshape(len(decode_tables), width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=device),
            rope_lengths=rope_lengths,
            attention_kernel=self.attention_kernel,
        )
        if slots is not None:
            meta.lora = slots.batch_for([(c.seq.adapter, c.width) for c in chunks])
        return torch.tensor(ids, dtype=torch.long, device=device), torch.tensor(positions, dtype=torch.long, device=device), meta
