"""The engine's settings: one dataclass, parsed once at the edge (CLI or test) and passed down.

Every default lives here and only here, so ``--help``, ``/info`` and the engine cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QUANTIZATIONS = ("int8", "int4")  # --quantize: weight-only, of the base's projections (server/model/quantized.py)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # --quantize-group-size: what the int4 kernels take


@dataclass(slots=True)
class EngineConfig:
    model: str
    dtype: str = "auto"  # auto: bfloat16 on a cpu with bf16 units (AVX512-BF16, AMX), else float32; the checkpoint's dtype on cuda
    device: str = "cpu"
    allow_pickle: bool = False
    block_size: int = 16
    kv_cache_memory: int | None = None  # bytes; None: 1 GiB on cpu, kv_cache_fraction of free memory on cuda
    kv_cache_fraction: float = 0.85
    max_input_length: int = 1024
    max_total_tokens: int = 2048
    max_batch_prefill_tokens: int = 4096
    max_batch_total_tokens: int = 65536
    max_running_requests: int = 256
    max_lora_rank: int = 64
    max_active_adapters: int = 8
    adapter_memory: int | None = None  # bytes for device slots; when set, the slot count follows from it
    lora_kernel: str = "auto"  # auto: triton on cuda, torch elsewhere; or "torch" / "triton"
    attention_kernel: str = "auto"  # the same choice for decode attention over the paged cache
    cuda_graphs: str = "auto"  # auto: decode steps replayed from CUDA graphs on cuda (Triton kernels, length-free RoPE); "on" / "off"
    linear_kernel: str = "auto"  # auto: oneDNN-packed weights on cpu where torch has them, F.linear elsewhere; or "torch" / "onednn"
    adapter_roots: list[Path] = field(default_factory=list)
    adapter_cache_dir: Path = Path("/data/adapters")
    adapter_disk_cache: int = 20 << 30
    adapter_cpu_memory: int = 4 << 30
    adapter_cycle_time_s: float = 2.0
    quantize: str | None = None  # weight-only quantization of the base's projections at load: int8 or int4 (None: as loaded)
    quantize_group_size: int = 32  # int4: inputs per (scale, min) group (GGUF Q4 uses 32 too)
    prefix_caching: bool = True  # reuse full KV blocks of a prefix already computed (per adapter, never across adapters)

    def validate(self) -> None:
        problems = []
        if self.block_size <= 0:
            problems.append(f"block_size must be > 0, got {self.block_size}")
        if self.max_input_length <= 0 or self.max_input_length >= self.max_total_tokens:
            problems.append(f"max_input_length ({self.max_input_length}) must be > 0 and < max_total_tokens ({self.max_total_tokens})")
        if self.max_batch_prefill_tokens <= 0:
            problems.append(f"max_batch_prefill_tokens must be > 0, got {self.max_batch_prefill_tokens}")
        if self.max_batch_total_tokens < self.max_total_tokens:
            problems.append(
                f"max_batch_total_tokens ({self.max_batch_total_tokens}) must be >= max_total_tokens ({self.max_total_tokens})"
            )
        if self.max_lora_rank <= 0 or self.max_active_adapters < 0:
            problems.append("max_lora_rank must be > 0 and max_active_adapters >= 0")
        for name in ("lora_kernel", "attention_kernel"):
            if getattr(self, name) not in ("auto", "torch", "triton"):
                problems.append(f"{name} must be auto, torch or triton, got {getattr(self, name)!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            problems.append(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.linear_kernel not in ("auto", "torch", "onednn"):
            problems.append(f"linear_kernel must be auto, torch or onednn, got {self.linear_kernel!r}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            problems.append(f"quantize must be {' or '.join(QUANTIZATIONS)}, got {self.quantize!r}")
        if self.quantize_group_size not in INT4_GROUP_SIZES:
            *first, last = INT4_GROUP_SIZES
            problems.append(f"quantize_group_size must be {', '.join(map(str, first))} or {last}, got {self.quantize_group_size}")
        if problems:
            raise ValueError("; ".join(problems))
