"""The engine's settings: one dataclass, parsed once at the edge (CLI or test) and passed down.

Every default, help text and bound lives here and only here, so ``--help``, the environment, ``/info``, the CRD and the
engine cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lorafleet.settings import optional, positive, setting, size

QUANTIZATIONS = ("int8", "int4", "nf4")  # --quantize: weight-only, of the base's projections (server/model/quantized.py)
INT4_GROUP_SIZES = (32, 64, 128, 256)  # --quantize-group-size: what the int4 kernels take
SPECULATIVE_MODES = ("ngram", "off")  # --speculative (server/engine/speculation.py)
MAX_SPECULATIVE_TOKENS = 16
MAX_SPECULATIVE_NGRAM = 8
SIZE_PATTERN = r"^[0-9]+(\.[0-9]+)?[KMGT]?i?B?$"  # what settings.size parses, as the CRD admits it


@dataclass(slots=True)
class EngineConfig:
    """Each field made with ``setting`` is also a ``lorafleet serve`` flag, a LORAFLEET_ variable and a line of /info;
    those with ``crd=`` are BaseModel ``spec.engine`` properties too (lorafleet/settings.py)."""

    model: str  # the folder --model resolved to (ServeConfig.model_id is what was named)
    dtype: str = setting("auto", help="auto (cpu: bfloat16 where it has AMX, else float32; cuda: the checkpoint's), float32, bfloat16, float16")
    device: str = setting("cpu", help="cpu or cuda", crd={"type": "string", "enum": ["cpu", "cuda"], "default": "cuda"})
    allow_pickle: bool = setting(False, parse=None, help="allow pickle (.bin) checkpoints and adapters")
    block_size: int = setting(16, parse=positive(int), help="tokens per KV cache block")
    kv_cache_memory: int | None = setting(None, parse=size, help="bytes for the KV cache (default: 1G on cpu, a fraction of free memory on cuda)")
    kv_cache_fraction: float = setting(0.85, parse=positive(float), help="cuda without --kv-cache-memory: the share of free device memory the KV cache takes")
    max_input_length: int = setting(1024, parse=positive(int), help="longest input in tokens", crd={"type": "integer", "minimum": 1, "default": 1024})
    max_total_tokens: int = setting(2048, parse=positive(int), help="longest input + output in tokens", crd={"type": "integer", "minimum": 2, "default": 2048})
    max_batch_prefill_tokens: int = setting(4096, parse=positive(int), help="prompt tokens prefilled in one step", crd={"type": "integer", "minimum": 1})
    max_batch_total_tokens: int = setting(65536, parse=positive(int), help="tokens of all running sequences together", crd={"type": "integer", "minimum": 2})
    max_running_requests: int = setting(256, parse=positive(int), help="sequences decoded in one step at most",
                                        crd={"type": "integer", "minimum": 1, "maximum": 4096})
    max_lora_rank: int = setting(64, parse=positive(int), help="largest adapter rank a slot holds",
                                 crd={"type": "integer", "minimum": 1, "maximum": 512, "default": 64})
    max_active_adapters: int = setting(8, parse=positive(int), help="device slots for adapters",
                                       crd={"type": "integer", "minimum": 1, "maximum": 4096, "default": 8})
    adapter_memory: int | None = setting(None, parse=size, help="bytes for device slots instead of a count (the count follows from --max-lora-rank; "
                                         "CPU slots are float32 whatever --dtype)", crd={"type": "string", "pattern": SIZE_PATTERN})
    lora_kernel: str = setting("auto", help="auto (triton on cuda, torch elsewhere), torch or triton: the batched LoRA kernels")
    attention_kernel: str = setting("auto", help="auto (triton on cuda, torch elsewhere), torch or triton: decode attention over the paged cache")
    cuda_graphs: str = setting("auto", help="auto (decode steps replayed from CUDA graphs on cuda, with the Triton kernels and a length-free RoPE), on or off")
    linear_kernel: str = setting("auto", help="auto (oneDNN-packed weights on cpu where torch has them, F.linear elsewhere), torch or onednn")
    adapter_roots: list[Path] = setting(parse=Path, flag="--adapter-root", multiple=True, default_factory=list,
                                        help="a folder local adapters may be loaded from (repeatable)")
    adapter_cache_dir: Path = setting(Path("/data/adapters"), parse=Path, help="the disk tier of the adapter cache")
    adapter_disk_cache: int = setting(20 << 30, parse=size, help="bytes the disk tier may hold (suffixes K, M, G)")
    adapter_cpu_memory: int = setting(4 << 30, parse=size, help="bytes of CPU memory for parsed adapters")
    adapter_cycle_time_s: float = setting(2.0, parse=float, help="how long an adapter keeps a slot while others wait for one")
    quantize: str | None = setting(None, parse=optional, help="weight-only quantization of the base's projections at load: int8 (per channel), "
                                   "int4 (grouped) or nf4 (QLoRA's base, blocks of 64, as bitsandbytes makes it); adapters stay in the "
                                   "activation dtype",
                                   crd={"type": "string", "enum": list(QUANTIZATIONS),
                                        "description": "weight-only quantization of the base's projections at load (adapters stay in the activation dtype)"})
    quantize_group_size: int = setting(32, parse=positive(int), help="int4: inputs per scale group (32, 64, 128 or 256; GGUF Q4 uses 32 too)",
                                       crd={"type": "integer", "enum": list(INT4_GROUP_SIZES), "default": 32, "description": "int4: inputs per scale group"})
    prefix_caching: bool = setting(True, parse=None, help="reuse the KV blocks of prompt prefixes already computed, per adapter",
                                   crd={"type": "boolean", "default": True, "description": "reuse KV blocks of prompt prefixes already computed, per adapter"})
    speculative: str = setting("off", help="ngram: propose each request's next tokens from its own prompt and output (prompt lookup) and verify "
                               "them in one forward pass, under its own adapter; off: one token per step",
                               crd={"type": "string", "enum": list(SPECULATIVE_MODES), "default": "off",
                                    "description": "speculative decoding: ngram (prompt lookup, exact: verified per request under its adapter) or off"})
    speculative_tokens: int = setting(4, parse=positive(int), help="ngram: most tokens proposed per request per step",
                                      crd={"type": "integer", "minimum": 1, "maximum": MAX_SPECULATIVE_TOKENS, "default": 4})
    speculative_ngram: int = setting(3, parse=positive(int), help="ngram: longest suffix matched against the request's earlier tokens (down to 2)",
                                     crd={"type": "integer", "minimum": 1, "maximum": MAX_SPECULATIVE_NGRAM, "default": 3})

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
            problems.append(f"quantize must be {', '.join(QUANTIZATIONS[:-1])} or {QUANTIZATIONS[-1]}, got {self.quantize!r}")
        if self.quantize_group_size not in INT4_GROUP_SIZES:
            *first, last = INT4_GROUP_SIZES
            problems.append(f"quantize_group_size must be {', '.join(map(str, first))} or {last}, got {self.quantize_group_size}")
        if self.speculative not in SPECULATIVE_MODES:
            problems.append(f"speculative must be ngram or off, got {self.speculative!r}")
        if not 1 <= self.speculative_tokens <= MAX_SPECULATIVE_TOKENS or not 1 <= self.speculative_ngram <= MAX_SPECULATIVE_NGRAM:
            problems.append(f"speculative_tokens must be 1..{MAX_SPECULATIVE_TOKENS} and speculative_ngram 1..{MAX_SPECULATIVE_NGRAM}, "
                            f"got {self.speculative_tokens} and {self.speculative_ngram}")
        if problems:
            raise ValueError("; ".join(problems))
