"""Where adapters come from: the Hugging Face Hub, a local folder under an allowed root, or S3.

Every source ends the same way: the adapter's two files (``adapter_config.json`` and
``adapter_model.safetensors``) in a folder on local disk. ``local`` never leaves the configured
roots — ``..``, absolute paths elsewhere and symlinks that resolve outside are refused — because an
adapter id arrives from the network. An adapter that does not exist is ``AdapterNotFound`` (HTTP
404); one that cannot be fetched is ``AdapterFetchError`` (424).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
SOURCES = ("hub", "local", "s3")


class AdapterNotFound(LookupError):
    """The adapter does not exist at its source."""


class AdapterFetchError(RuntimeError):
    """The adapter exists (or may) but could not be fetched."""


@dataclass(frozen=True, slots=True)
class AdapterRef:
    source: str
    id: str
    revision: str | None = None

    @property
    def key(self) -> str:
        """One name per adapter version, used by every tier and by the engine's slots."""
        return f"{self.source}:{self.id}" + (f"@{self.revision}" if self.revision else "")

    @classmethod
    def parse(cls, adapter_id: str, source: str) -> "AdapterRef":
        if source not in SOURCES:
            raise ValueError(f"adapter_source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not adapter_id or not adapter_id.strip():
            raise ValueError("adapter_id must not be empty")
        revision = None
        if source == "hub" and "@" in adapter_id:
            adapter_id, revision = adapter_id.rsplit("@", 1)
        if source == "s3" and not adapter_id.startswith("s3://"):
            raise ValueError(f"an s3 adapter_id must look like s3://bucket/prefix, got {adapter_id!r}")
        return cls(source, adapter_id, revision)


def resolve_local(adapter_id: str, roots: list[Path]) -> Path:
    """The folder an id names under one of ``roots``; refuses anything that escapes them."""
    if not roots:
        raise AdapterNotFound("no --adapter-root is configured, so local adapters are disabled")
    candidate = Path(adapter_id)
    if "\x00" in adapter_id or ".." in candidate.parts:
        raise ValueError(f"local adapter {adapter_id!r} must not contain '..' or NUL")
    escaped = False
    for root in (r.resolve() for r in roots):
        path = (root / candidate).resolve()  # an absolute candidate replaces the root; symlinks are followed
        if path != root and root not in path.parents:
            escaped = True
            continue
        if path.is_dir():
            return path
    if escaped:
        raise ValueError(f"local adapter {adapter_id!r} resolves outside the allowed adapter roots")
    raise AdapterNotFound(f"local adapter {adapter_id!r} not found under the adapter roots")


def fetch_hub(ref: AdapterRef, destination: Path, token: str | None) -> None:
    """Download the adapter's files from the Hub (HF_ENDPOINT, HF_HUB_OFFLINE and HF_TOKEN are honoured by huggingface_hub)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    for filename in ADAPTER_FILES:
        try:
            # Read the environment per call (huggingface_hub reads it once at import), so a
            # replica's HF_ENDPOINT, HF_HUB_CACHE and HF_TOKEN always apply.
            path = hf_hub_download(
                ref.id, filename, revision=ref.revision,
                token=token or os.environ.get("HF_TOKEN") or None,
                endpoint=os.environ.get("HF_ENDPOINT") or None,
                cache_dir=os.environ.get("HF_HUB_CACHE") or None,
            )
        except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
            raise AdapterNotFound(f"hub adapter {ref.id!r} not found (or private without a valid token)") from exc
        except EntryNotFoundError as exc:
            raise AdapterNotFound(f"hub repo {ref.id!r} has no {filename}: not a PEFT LoRA adapter") from exc
        except GatedRepoError as exc:
            raise AdapterFetchError(f"hub adapter {ref.id!r} is gated: {exc}") from exc
        except LocalEntryNotFoundError as exc:
            raise AdapterFetchError(f"hub adapter {ref.id!r} is not in the offline cache and the hub is unreachable") from exc
        except Exception as exc:  # network errors of every kind
            raise AdapterFetchError(f"fetching hub adapter {ref.id!r} failed: {exc}") from exc
        destination.mkdir(parents=True, exist_ok=True)
        (destination / filename).write_bytes(Path(path).read_bytes())


def fetch_s3(ref: AdapterRef, destination: Path) -> None:
    """Download ``s3://bucket/prefix/{adapter_config.json,adapter_model.safetensors}`` (S3_ENDPOINT_URL for other stores)."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise AdapterFetchError("the s3 source needs boto3 (pip install 'lorafleet[s3]')") from exc
    bucket, _, prefix = ref.id[len("s3://") :].partition("/")
    client = boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)
    destination.mkdir(parents=True, exist_ok=True)
    for filename in ADAPTER_FILES:
        key = f"{prefix.rstrip('/')}/{filename}" if prefix else filename
        try:
            client.download_file(bucket, key, str(destination / filename))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                raise AdapterNotFound(f"s3 adapter {ref.id!r}: {key} not found in bucket {bucket!r}") from exc
            raise AdapterFetchError(f"s3 adapter {ref.id!r}: {exc}") from exc
        except BotoCoreError as exc:
            raise AdapterFetchError(f"s3 adapter {ref.id!r}: {exc}") from exc
