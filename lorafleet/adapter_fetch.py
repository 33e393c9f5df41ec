"""Fetching one adapter file from the Hugging Face Hub or S3, shared by the replicas and the operator.

Both must read the same sources the same way and tell the same two failures apart: the adapter
does not exist (``AdapterNotFound``: change the request) and the source could not be reached or
refused (``AdapterFetchError``: try again later). No torch here: the operator imports it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


class AdapterNotFound(LookupError):
    """The adapter does not exist at its source."""


class AdapterFetchError(RuntimeError):
    """The adapter exists (or may) but could not be fetched."""


class SourceUnreachable(AdapterFetchError):
    """The source itself could not be reached: every fetch from it would fail the same way for now."""


def hub_file(repo: str, filename: str, revision: str | None, token: str | None, local_dir: Path | None = None) -> Path:
    """One file of a hub repo, through huggingface_hub: into ``local_dir`` when given, else into its cache.

    A replica passes ``local_dir`` (its disk tier's staging folder), so the bytes land once, inside the tier's bound;
    through the cache they were stored twice, and the cache's copy was never evicted. The environment is read per
    call (huggingface_hub reads it once at import), so HF_ENDPOINT, HF_HUB_CACHE and HF_TOKEN as they are now apply.
    """
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo, filename):
        return Path(hf_hub_download(repo, filename, revision=revision, token=token or os.environ.get("HF_TOKEN") or None,
                                    endpoint=os.environ.get("HF_ENDPOINT") or None, cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                    local_dir=local_dir))


def hub_commit(repo: str, filename: str, revision: str | None, token: str | None) -> str:
    """The commit a revision (a branch or a tag) of a hub repo stands for now, read from ``filename``'s metadata."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    endpoint = os.environ.get("HF_ENDPOINT") or None
    with _hub_errors(repo, filename):
        commit = get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision, endpoint=endpoint),
                                      token=token or os.environ.get("HF_TOKEN") or None, endpoint=endpoint).commit_hash
    if not commit:
        raise AdapterFetchError(f"hub adapter {repo!r}: the hub named no commit for revision {revision!r}")
    return commit


@contextlib.contextmanager
def _hub_errors(repo: str, filename: str) -> Iterator[None]:
    """huggingface_hub's errors as the two failures callers tell apart."""
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        yield
    # Order matters: LocalEntryNotFoundError (the hub could not be reached) subclasses
    # EntryNotFoundError (the repo has no such file), and GatedRepoError subclasses RepositoryNotFoundError.
    except LocalEntryNotFoundError as exc:
        raise SourceUnreachable(f"hub adapter {repo!r}: the hub is unreachable and the file is not in the local cache") from exc
    except GatedRepoError as exc:
        raise AdapterFetchError(f"hub adapter {repo!r} is gated: {exc}") from exc
    except (RepositoryNotFoundError, RevisionNotFoundError) as exc:
        raise AdapterNotFound(f"hub adapter {repo!r} not found (or private without a valid token)") from exc
    except EntryNotFoundError as exc:
        raise AdapterNotFound(f"hub repo {repo!r} has no {filename}: not a PEFT LoRA adapter") from exc
    except Exception as exc:  # network errors of every kind
        raise SourceUnreachable(f"fetching hub adapter {repo!r} failed: {exc}") from exc


def s3_file(s3_id: str, filename: str, destination: Path) -> None:
    """``s3://bucket/prefix`` + ``filename`` into ``destination`` (S3_ENDPOINT_URL for other stores)."""
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as exc:
        raise AdapterFetchError("the s3 source needs boto3 (pip install 'lorafleet[s3]')") from exc
    bucket, _, prefix = s3_id[len("s3://") :].partition("/")
    key = f"{prefix.rstrip('/')}/{filename}" if prefix else filename
    try:
        boto3.client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None).download_file(bucket, key, str(destination))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code", "") in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
            raise AdapterNotFound(f"s3 adapter {s3_id!r}: {key} not found in bucket {bucket!r}") from exc
        raise AdapterFetchError(f"s3 adapter {s3_id!r}: {exc}") from exc
    except BotoCoreError as exc:  # endpoint unreachable, timeouts, credentials that cannot be found
        raise SourceUnreachable(f"s3 adapter {s3_id!r}: {exc}") from exc
