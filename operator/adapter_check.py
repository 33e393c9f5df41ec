"""Validating an Adapter before warming it: does it exist, is it a LoRA, does it fit the BaseModel?

Reads only ``adapter_config.json`` (through huggingface_hub for the hub, boto3 for S3) and applies
the replicas' own rules to it (lorafleet/adapter_rules.py), so the operator never needs torch. Errors are sorted into permanent (the spec must change) and
transient (retry with backoff).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from lorafleet.adapter_fetch import AdapterFetchError, AdapterNotFound, hub_commit, hub_file, s3_file
from lorafleet.adapter_rules import MAX_ID_LENGTH, MAX_REVISION_LENGTH, AdapterRuleError, check_config
from lorafleet.operator.config import DEFAULT_MAX_LORA_RANK


class Permanent(Exception):
    """The adapter cannot work until its spec changes."""


class Transient(Exception):
    """Worth retrying: the source did not answer."""


REVISION = re.compile(r"[A-Za-z0-9._/-]+")  # a branch, a tag or a commit: what the hub and git accept
COMMIT = re.compile(r"[0-9a-f]{40}")


def check_reference(source: str, adapter_id: str, revision: str | None) -> None:
    """Refuse what no replica would load, before any replica is asked: a local id is a folder under the replicas'
    adapter roots, never an absolute path or one that climbs out of them (the CRD says so too; this holds where
    an API server does not evaluate its rules)."""
    if not adapter_id or len(adapter_id) > MAX_ID_LENGTH or any(ch.isspace() or ord(ch) < 32 for ch in adapter_id):
        raise Permanent(f"spec.id must be 1 to {MAX_ID_LENGTH} characters without spaces or control characters")
    if source == "local" and (adapter_id.startswith(("/", "~")) or "\\" in adapter_id or ".." in adapter_id.split("/")):
        raise Permanent(f"spec.id {adapter_id[:80]!r} is a path outside the adapter roots: a local id names a folder under "
                        "them (no leading '/', no '..')")
    if source == "hub" and revision is not None and "@" in adapter_id:
        raise Permanent(f"spec.id {adapter_id[:80]!r} names a revision after '@' and spec.revision names another: give one")
    if revision is not None and (len(revision) > MAX_REVISION_LENGTH or not REVISION.fullmatch(revision) or ".." in revision):
        raise Permanent(f"spec.revision must be a branch, tag or commit of at most {MAX_REVISION_LENGTH} characters "
                        "(letters, digits, '.', '_', '/', '-')")


def fetch_config(source: str, adapter_id: str, revision: str | None, token: str | None) -> dict[str, Any] | None:
    """The adapter's adapter_config.json; None for local adapters (only the replicas can see their folders)."""
    check_reference(source, adapter_id, revision)
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


def validate(source: str, adapter_id: str, revision: str | None, engine: dict[str, Any]) -> tuple:
    """("ok", rank, targets, the commit a moving hub revision stands for) for an Adapter that may be warmed (rank and
    targets None and [] for a local one: only the replicas see its folder); Permanent or Transient otherwise."""
    config = fetch_config(source, adapter_id, revision, None)
    fits = check_fits(config, engine) if config is not None else (None, [])
    return ("ok", *fits, resolve_revision(source, adapter_id, revision, None))


def moving(source: str, revision: str | None) -> bool:
    """A hub revision that names a branch or a tag (not a commit): what it stands for can change."""
    return source == "hub" and revision is not None and not COMMIT.fullmatch(revision)


def resolve_revision(source: str, adapter_id: str, revision: str | None, token: str | None) -> str | None:
    """The commit a hub Adapter's ``spec.revision`` names now, when it names a branch or a tag (None otherwise).

    A branch moves: replicas loading ``main`` at different times would serve different weights under one version.
    The operator resolves it once per version change and has every replica load that commit. Without a
    ``spec.revision`` an Adapter follows the repo's default branch as each replica loads it (requests by bare id
    route by it, so it is not rewritten): name a revision to pin it."""
    if not moving(source, revision):
        return None
    try:
        return hub_commit(adapter_id, "adapter_config.json", revision, token)
    except AdapterNotFound as exc:
        raise Permanent(str(exc)) from exc
    except AdapterFetchError as exc:
        raise Transient(str(exc)) from exc


def check_fits(config: dict[str, Any], engine: dict[str, Any]) -> tuple[int, list[str]]:
    """(rank, target modules) when the adapter fits the BaseModel's engine; Permanent with the reason when not."""
    try:
        return check_config(config, engine.get("maxLoraRank", DEFAULT_MAX_LORA_RANK), "the BaseModel's engine.maxLoraRank")
    except AdapterRuleError as exc:
        raise Permanent(str(exc)) from None
