"""Validating an Adapter before warming it: does it exist, is it a LoRA, does it fit the BaseModel?

Reads only ``adapter_config.json`` (through huggingface_hub for the hub, boto3 for S3), so the
operator never needs torch. Errors are sorted into permanent (the spec must change) and
transient (retry with backoff).
"""

from __future__ import annotations

import json
import os
from typing import Any

PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class Permanent(Exception):
    """The adapter cannot work until its spec changes."""


class Transient(Exception):
    """Worth retrying: the source did not answer."""


def fetch_config(source: str, adapter_id: str, revision: str | None, token: str | None) -> dict[str, Any] | None:
    """The adapter's adapter_config.json; None for local adapters (only the replicas can see their folders)."""
    if source == "local":
        return None
    if source == "hub":
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            path = hf_hub_download(adapter_id, "adapter_config.json", revision=revision, token=token or os.environ.get("HF_TOKEN") or None,
                                   endpoint=os.environ.get("HF_ENDPOINT") or None)
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise Permanent(f"hub adapter {adapter_id!r} does not exist (or is private and no token was given)") from exc
        except EntryNotFoundError as exc:
            raise Permanent(f"hub repo {adapter_id!r} has no adapter_config.json: not a PEFT adapter") from exc
        except GatedRepoError as exc:
            raise Permanent(f"hub adapter {adapter_id!r} is gated: {exc}") from exc
        except Exception as exc:
            raise Transient(f"the hub did not answer for {adapter_id!r}: {exc}") from exc
        with open(path) as handle:
            return json.load(handle)
    if source == "s3":
        try:
            import boto3
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError as exc:
            raise Permanent("the s3 source needs boto3 in the operator image") from exc
        bucket, _, prefix = adapter_id[len("s3://"):].partition("/")
        key = f"{prefix.rstrip('/')}/adapter_config.json" if prefix else "adapter_config.json"
        try:
            body = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None).get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NoSuchBucket"):
                raise Permanent(f"s3 adapter {adapter_id!r} has no {key}") from exc
            raise Transient(f"s3 did not answer for {adapter_id!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise Transient(f"s3 did not answer for {adapter_id!r}: {exc}") from exc
        return json.loads(body)
    raise Permanent(f"unknown adapter source {source!r}")


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
