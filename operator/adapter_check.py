"""Validating an Adapter before warming it: does it exist, is it a LoRA, does it fit the BaseModel?

Reads only ``adapter_config.json`` (through huggingface_hub for the hub, boto3 for S3), so the
operator never needs torch. Errors are sorted into permanent (the spec must change) and
transient (retry with backoff).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lorafleet.adapter_fetch import AdapterFetchError, AdapterNotFound, hub_file, s3_file

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class Permanent(Exception):
    """The adapter cannot work until its spec changes."""


class Transient(Exception):
    """Worth retrying: the source did not answer."""


def fetch_config(source: str, adapter_id: str, revision: str | None, token: str | None) -> dict[str, Any] | None:
    """The adapter's adapter_config.json; None for local adapters (only the replicas can see their folders)."""
    if source == "local":
        return None
    if source not in ("hub", "s3"):
        raise Permanent(f"unknown adapter source {source!r}")
    try:
        if source == "hub":
            return json.loads(hub_file(adapter_id, "adapter_config.json", revision, token).read_text())
        with tempfile.TemporaryDirectory() as tmp:
            s3_file(adapter_id, "adapter_config.json", Path(tmp) / "adapter_config.json")
            return json.loads((Path(tmp) / "adapter_config.json").read_text())
    except AdapterNotFound as exc:
        raise Permanent(str(exc)) from exc
    except AdapterFetchError as exc:
        raise Transient(str(exc)) from exc


def check_fits(config: dict[str, Any], engine: dict[str, Any]) -> tuple[int, list[str]]:
    """(rank, target modules) when the adapter fits the BaseModel's engine; Permanent with the reason when not."""
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise Permanent(f"peft_type {config.get('peft_type')} is not a LoRA adapter")
    if config.get("use_dora"):
        raise Permanent("DoRA adapters are not supported")
    if config.get("modules_to_save"):
        raise Permanent(f"modules_to_save {config['modules_to_save']} is not supported")
    ranks = [int(config.get("r", 8)), *[int(r) for r in (config.get("rank_pattern") or {}).values()]]
    rank = max(ranks)
    limit = engine.get("maxLoraRank", 64)
    if rank > limit:
        raise Permanent(f"rank {rank} is above the BaseModel's engine.maxLoraRank {limit}")
    targets = config.get("target_modules") or []
    if isinstance(targets, list):
        unknown = sorted({t.split(".")[-1] for t in targets} - PROJECTIONS)
        if unknown:
            raise Permanent(f"LoRA on {unknown} is not supported; targets must be among {sorted(PROJECTIONS)}")
        return rank, sorted({t.split(".")[-1] for t in targets})
    return rank, [str(targets)]
