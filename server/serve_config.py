"""``lorafleet serve``'s flags: each defined once, with its default, help and LORAFLEET_<FLAG> variable.

The parser is built from the table; ``/info`` reports the parsed values. Values from the
environment are parsed exactly as the command line would parse them, so a bad one fails the same way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from lorafleet.http_limits import MAX_BODY_BYTES
from lorafleet.server.config import EngineConfig


@dataclass(slots=True)
class ServeConfig:
    engine: EngineConfig
    model_id: str = "smollm2"  # what --model named; the engine gets the folder it resolves to
    model_source: str = "auto"
    revision: str | None = None
    host: str = "127.0.0.1"
    port: int = 8080
    adapter_source: str = "hub"
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_best_of: int = 2
    max_body_bytes: int = MAX_BODY_BYTES
    preload_adapters: list[str] = field(default_factory=list)
    grace_period_s: float = 30.0
    admin_token: str | None = None
    admin_open: bool = False  # no token and open admin routes: a laptop's choice, never a default
    warm_token: str | None = None  # the gateways' credential: POST /adapters/warm and nothing else
    served_model_name: str | None = None  # the base model's name for clients (the operator passes the BaseModel's)
    metrics_adapter_labels: int = 32  # adapters with series of their own in /metrics; the rest are "other"
    otlp_endpoint: str | None = None  # traces go here (OTLP/HTTP); None: off unless OTEL_EXPORTER_OTLP_ENDPOINT is set


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024); "1.5G", "512Mi", "2GiB" and "1.5" all parse,
    as the BaseModel CRD's pattern for engine.adapterMemory admits them."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(float(text))


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _default(config: type, name: str) -> Any:
    """A flag's default is its field's default: one declaration, read by --help, the parser and /info."""
    found = next(f for f in fields(config) if f.name == name)
    return found.default_factory() if found.default_factory is not MISSING else found.default


_E, _S = EngineConfig, ServeConfig
# (flag, type, default, help, multiple?); every default comes from EngineConfig or ServeConfig.
FLAGS: list[tuple[str, Callable[[str], Any] | None, Any, str, bool]] = [
    ("--model", str, _default(_S, "model_id"), "base model: a known name (smollm2), a local folder, or a hub id", False),
    ("--model-source", str, _default(_S, "model_source"), "where --model lives: auto, local or hub", False),
    ("--revision", str, _default(_S, "revision"), "hub revision of the base model", False),
    ("--dtype", str, _default(_E, "dtype"), "auto (cpu: bfloat16 where it has bf16 units, else float32; cuda: the checkpoint's), float32, bfloat16, float16", False),
    ("--device", str, _default(_E, "device"), "cpu or cuda", False),
    ("--host", str, _default(_S, "host"), "address to listen on", False),
    ("--port", _positive(int), _default(_S, "port"), "port to listen on", False),
    ("--adapter-source", str, _default(_S, "adapter_source"), "default adapter_source for requests that name none: hub, local or s3", False),
    ("--adapter-root", Path, None, "a folder local adapters may be loaded from (repeatable)", True),
    ("--adapter-cache-dir", Path, _default(_E, "adapter_cache_dir"), "the disk tier of the adapter cache", False),
    ("--adapter-disk-cache", _size, _default(_E, "adapter_disk_cache"), "bytes the disk tier may hold (suffixes K, M, G)", False),
    ("--adapter-cpu-memory", _size, _default(_E, "adapter_cpu_memory"), "bytes of CPU memory for parsed adapters", False),
    ("--adapter-cycle-time-s", float, _default(_E, "adapter_cycle_time_s"), "how long an adapter keeps a slot while others wait for one", False),
    ("--max-active-adapters", _positive(int), _default(_E, "max_active_adapters"), "device slots for adapters", False),
    ("--adapter-memory", _size, _default(_E, "adapter_memory"), "bytes for device slots instead of a count (the count follows from --max-lora-rank; CPU slots are float32 whatever --dtype)", False),
    ("--max-lora-rank", _positive(int), _default(_E, "max_lora_rank"), "largest adapter rank a slot holds", False),
    ("--max-concurrent-requests", _positive(int), _default(_S, "max_concurrent_requests"), "sequences in flight before new requests get 429", False),
    ("--max-input-length", _positive(int), _default(_E, "max_input_length"), "longest input in tokens", False),
    ("--max-total-tokens", _positive(int), _default(_E, "max_total_tokens"), "longest input + output in tokens", False),
    ("--max-batch-total-tokens", _positive(int), _default(_E, "max_batch_total_tokens"), "tokens of all running sequences together", False),
    ("--max-batch-prefill-tokens", _positive(int), _default(_E, "max_batch_prefill_tokens"), "prompt tokens prefilled in one step", False),
    ("--max-stop-sequences", _positive(int), _default(_S, "max_stop_sequences"), "stop sequences per request", False),
    ("--max-best-of", _positive(int), _default(_S, "max_best_of"), "largest best_of", False),
    ("--max-body-bytes", _size, _default(_S, "max_body_bytes"), "largest request body", False),
    ("--kv-cache-memory", _size, _default(_E, "kv_cache_memory"), "bytes for the KV cache (default: 1G on cpu, a fraction of free memory on cuda)", False),
    ("--preload-adapter", str, None, "adapter id to load and pin at start-up (repeatable; source: --adapter-source)", True),
    ("--grace-period-s", float, _default(_S, "grace_period_s"), "on SIGTERM, how long running requests may finish", False),
    ("--admin-token", str, _default(_S, "admin_token"), "bearer token POST and DELETE /adapters require (load, pin, unload); set it from a Secret "
     "through LORAFLEET_ADMIN_TOKEN rather than on the command line. Unset: those routes are refused (403) unless --admin-open", False),
    ("--admin-open", None, _default(_S, "admin_open"), "without --admin-token, let anyone who reaches this replica load, pin, unload and "
     "warm adapters (a laptop; never a shared network)", False),
    ("--warm-token", str, _default(_S, "warm_token"), "bearer token that allows POST /adapters/warm and nothing else: the gateways' "
     "credential for hand-offs (the admin token allows it too); set it through LORAFLEET_WARM_TOKEN", False),
    ("--served-model-name", str, _default(_S, "served_model_name"), "the name clients use for the base model in `model` and /v1/models "
     "(the operator passes the BaseModel's name); --model's value is accepted too", False),
    ("--metrics-adapter-labels", _positive(int), _default(_S, "metrics_adapter_labels"), "adapters with per-adapter series of their own in "
     "/metrics (the busiest; the rest are counted as `other`), so thousands of adapters cannot grow it without bound", False),
    ("--otlp-endpoint", str, _default(_S, "otlp_endpoint"), "send traces here over OTLP/HTTP, e.g. http://otel-collector:4318 "
     "(OTEL_EXPORTER_OTLP_ENDPOINT and OTEL_SERVICE_NAME apply too); unset: tracing off", False),
    ("--quantize", str, _default(_E, "quantize"), "weight-only quantization of the base's projections at load: int8 (per channel) "
     "or int4 (grouped); adapters stay in the activation dtype", False),
    ("--quantize-group-size", _positive(int), _default(_E, "quantize_group_size"), "int4: inputs per scale group (32, 64, 128 or 256)", False),
    ("--prefix-caching", None, _default(_E, "prefix_caching"), "reuse the KV blocks of prompt prefixes already computed, per adapter", False),
    ("--allow-pickle", None, _default(_E, "allow_pickle"), "allow pickle (.bin) checkpoints and adapters", False),
]


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, help_text, multiple in FLAGS:
        env = "LORAFLEET_" + flag.lstrip("-").upper().replace("-", "_")
        raw = os.environ.get(env)
        if kind is None:  # a switch: --flag, and --no-flag too when it is on by default
            env_default = raw.lower() in ("1", "true", "yes") if raw is not None else default
            action, shown = (argparse.BooleanOptionalAction, " (default: on)") if default else ("store_true", "")
            parser.add_argument(flag, action=action, default=env_default, help=f"{help_text}{shown} [env {env}]")
            continue
        value = default
        if raw is not None:
            try:
                value = [kind(v) for v in raw.split(",") if v] if multiple else kind(raw)
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{env}={raw!r}: {exc}")
        shown = f" (default: {default})" if default not in (None, []) else ""
        if multiple:
            parser.add_argument(flag, type=kind, action="append", default=None, help=f"{help_text}{shown} [env {env}]")
            parser.set_defaults(**{flag.lstrip("-").replace("-", "_"): value or []})
        else:
            parser.add_argument(flag, type=kind, default=value, help=f"{help_text}{shown} [env {env}]")


def serve_config_from_args(args: argparse.Namespace, model_folder: Path) -> ServeConfig:
    engine = EngineConfig(
        model=str(model_folder), dtype=args.dtype, device=args.device, allow_pickle=args.allow_pickle,
        kv_cache_memory=args.kv_cache_memory, max_input_length=args.max_input_length, max_total_tokens=args.max_total_tokens,
        max_batch_prefill_tokens=args.max_batch_prefill_tokens, max_batch_total_tokens=args.max_batch_total_tokens,
        max_lora_rank=args.max_lora_rank, max_active_adapters=args.max_active_adapters, adapter_memory=args.adapter_memory,
        adapter_roots=list(args.adapter_root or []), adapter_cache_dir=args.adapter_cache_dir,
        adapter_disk_cache=args.adapter_disk_cache, adapter_cpu_memory=args.adapter_cpu_memory,
        adapter_cycle_time_s=args.adapter_cycle_time_s, prefix_caching=args.prefix_caching,
        quantize=args.quantize or None, quantize_group_size=args.quantize_group_size,
    )
    return ServeConfig(
        engine=engine, model_id=args.model, model_source=args.model_source, revision=args.revision, host=args.host, port=args.port, adapter_source=args.adapter_source,
        max_concurrent_requests=args.max_concurrent_requests, max_stop_sequences=args.max_stop_sequences,
        max_best_of=args.max_best_of, max_body_bytes=args.max_body_bytes, preload_adapters=list(args.preload_adapter or []),
        grace_period_s=args.grace_period_s, admin_token=args.admin_token or None, admin_open=args.admin_open,
        warm_token=args.warm_token or None,
        served_model_name=args.served_model_name or None, metrics_adapter_labels=args.metrics_adapter_labels,
        otlp_endpoint=args.otlp_endpoint or None,
    )
