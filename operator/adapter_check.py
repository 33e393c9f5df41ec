"""Validating an Adapter before warming it: does it exist, is it a LoRA, does it fit the BaseModel?

Reads only ``adapter_config.json`` (through huggingface_hub for the hub, boto3 for S3) and applies
the replicas' own rules to it (lorafleet/adapter_rules.py), so the operator never needs torch. Errors are sorted into permanent (the spec must change) and
transient (retry with backoff).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from lorafleet.adapter_fetch import AdapterFetchError, AdapterNotFound, hub_file, s3_file
from lorafleet.adapter_rules import AdapterRuleError, check_config


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
    try:
        return check_config(config, engine.get("maxLoraRank", 64), "the BaseModel's engine.maxLoraRank")
    except AdapterRuleError as exc:
        raise Permanent(str(exc)) from None
