"""``lorafleet serve``'s flags: each defined once, with its default, help and LORAFLEET_<FLAG> variable.

The parser is built from the table; ``/info`` reports the parsed values. Values from the
environment are parsed exactly as the command line would parse them, so a bad one fails the same way.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet.server.config import EngineConfig


@dataclass(slots=True)
class ServeConfig:
    engine: EngineConfig
    model_id: str
    host: str = "127.0.0.1"
    port: int = 8080
    adapter_source: str = "hub"
    max_concurrent_requests: int = 128
    max_stop_sequences: int = 4
    max_best_of: int = 2
    max_body_bytes: int = 2 << 20
    preload_adapters: list[str] = field(default_factory=list)
    grace_period_s: float = 30.0
    admin_token: str | None = None


def _size(text: str) -> int:
    """Bytes, with an optional K/M/G/T suffix (powers of 1024)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


# (flag, type, default, help, multiple?)
FLAGS: list[tuple[str, Callable[[str], Any], Any, str, bool]] = [
    ("--model", str, "smollm2", "base model: a known name (smollm2), a local folder, or a hub id", False),
    ("--model-source", str, "auto", "where --model lives: auto, local or hub", False),
    ("--revision", str, None, "hub revision of the base model", False),
    ("--dtype", str, "auto", "auto (float32 on cpu, the checkpoint's on cuda), float32, bfloat16, float16", False),
    ("--device", str, "cpu", "cpu or cuda", False),
    ("--host", str, "127.0.0.1", "address to listen on", False),
    ("--port", _positive(int), 8080, "port to listen on", False),
    ("--adapter-source", str, "hub", "default adapter_source for requests that name none: hub, local or s3", False),
    ("--adapter-root", Path, None, "a folder local adapters may be loaded from (repeatable)", True),
    ("--adapter-cache-dir", Path, Path("/data/adapters"), "the disk tier of the adapter cache", False),
    ("--adapter-disk-cache", _size, 20 << 30, "bytes the disk tier may hold (suffixes K, M, G)", False),
    ("--adapter-cpu-memory", _size, 4 << 30, "bytes of CPU memory for parsed adapters", False),
    ("--adapter-cycle-time-s", float, 2.0, "how long an adapter keeps a slot while others wait for one", False),
    ("--max-active-adapters", _positive(int), 8, "device slots for adapters", False),
    ("--adapter-memory", _size, None, "bytes for device slots instead of a count (the count follows from --max-lora-rank)", False),
    ("--max-lora-rank", _positive(int), 64, "largest adapter rank a slot holds", False),
    ("--max-concurrent-requests", _positive(int), 128, "requests in flight before new ones get 429", False),
    ("--max-input-length", _positive(int), 1024, "longest input in tokens", False),
    ("--max-total-tokens", _positive(int), 2048, "longest input + output in tokens", False),
    ("--max-batch-total-tokens", _positive(int), 65536, "tokens of all running sequences together", False),
    ("--max-batch-prefill-tokens", _positive(int), 4096, "prompt tokens prefilled in one step", False),
    ("--max-stop-sequences", _positive(int), 4, "stop sequences per request", False),
    ("--max-best-of", _positive(int), 2, "largest best_of", False),
    ("--max-body-bytes", _size, 2 << 20, "largest request body", False),
    ("--kv-cache-memory", _size, None, "bytes for the KV cache (default: 1G on cpu, a fraction of free memory on cuda)", False),
    ("--preload-adapter", str, None, "adapter id to load and pin at start-up (repeatable; source: --adapter-source)", True),
    ("--grace-period-s", float, 30.0, "on SIGTERM, how long running requests may finish", False),
    ("--admin-token", str, None, "bearer token POST and DELETE /adapters require (load, pin, unload); set it from a Secret "
     "through LORAFLEET_ADMIN_TOKEN rather than on the command line. Unset: those routes are open", False),
    ("--allow-pickle", None, False, "allow pickle (.bin) checkpoints and adapters", False),
]


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    for flag, kind, default, help_text, multiple in FLAGS:
        env = "LORAFLEET_" + flag.lstrip("-").upper().replace("-", "_")
        raw = os.environ.get(env)
        if kind is None:
            env_default = raw.lower() in ("1", "true", "yes") if raw is not None else default
            parser.add_argument(flag, action="store_true", default=env_default, help=f"{help_text} [env {env}]")
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
        adapter_cycle_time_s=args.adapter_cycle_time_s,
    )
    return ServeConfig(
        engine=engine, model_id=args.model, host=args.host, port=args.port, adapter_source=args.adapter_source,
        max_concurrent_requests=args.max_concurrent_requests, max_stop_sequences=args.max_stop_sequences,
        max_best_of=args.max_best_of, max_body_bytes=args.max_body_bytes, preload_adapters=list(args.preload_adapter or []),
        grace_period_s=args.grace_period_s, admin_token=args.admin_token or None,
    )
