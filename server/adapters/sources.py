"""Where adapters come from: the Hugging Face Hub, a local folder under an allowed root, or S3.

Every source ends the same way: the adapter's two files (``adapter_config.json`` and
``adapter_model.safetensors``) in a folder on local disk. ``local`` never leaves the configured
roots — ``..``, absolute paths elsewhere and symlinks that resolve outside are refused — because an
adapter id arrives from the network. An adapter that does not exist is ``AdapterNotFound`` (HTTP
404); one that cannot be fetched is ``AdapterFetchError`` (424).
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path

from lorafleet.adapter_fetch import AdapterFetchError, AdapterNotFound, SourceUnreachable, hub_file, s3_file
from lorafleet.adapter_ref import AdapterRef

__all__ = ["ADAPTER_FILES", "AdapterFetchError", "AdapterNotFound", "SourceUnreachable", "fetch_hub", "fetch_s3", "resolve_local"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


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
        if path == root:
            raise ValueError(f"local adapter {adapter_id!r} must name a folder under an adapter root, not a root itself")
        if root not in path.parents:
            escaped = True
            continue
        if path.is_dir():
            return path
    if escaped:
        raise ValueError(f"local adapter {adapter_id!r} resolves outside the allowed adapter roots")
    raise AdapterNotFound(f"local adapter {adapter_id!r} not found under the adapter roots")


# A remote fetch's whole budget: connect, metadata, every file, retries included. A hub that accepts connections and
# never answers (or trickles bytes) would otherwise hold a loader thread, and the requests waiting on it, for as long
# as the client library's per-read timeouts and retries allow (over a minute seen).
REMOTE_FETCH_DEADLINE_S = 20.0
SOURCE_NAMES = {"hub": "the hub", "s3": "the S3 endpoint"}


def within_deadline(fetch: Callable[[], None], source: str, adapter_id: str) -> None:
    """Run ``fetch`` on a thread of its own and give up on it after REMOTE_FETCH_DEADLINE_S: the loader thread returns
    (SourceUnreachable marks the source down), and the abandoned fetch ends by its library's own timeouts, writing
    nowhere (its staging folder is gone, and nothing recreates it)."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fetch()
        except BaseException as exc:  # handed to the caller below
            failure.append(exc)

    worker = threading.Thread(target=run, name=f"lorafleet-fetch-{source}", daemon=True)
    worker.start()
    worker.join(REMOTE_FETCH_DEADLINE_S)
    if worker.is_alive():
        raise SourceUnreachable(f"{source} adapter {adapter_id!r}: {SOURCE_NAMES[source]} is unreachable "
                                f"(no answer within {REMOTE_FETCH_DEADLINE_S:g}s)")
    if failure:
        raise failure[0]


def fetch_hub(ref: AdapterRef, destination: Path, token: str | None) -> None:
    """The adapter's files from the Hub, downloaded straight into ``destination`` (the disk tier's staging folder): one
    copy, inside the tier's bound. huggingface_hub's bookkeeping for a local_dir (``.cache/``) is dropped with it."""
    def files() -> None:
        for filename in ADAPTER_FILES:
            if not destination.is_dir():
                return  # the fetch outlived its deadline and the staging folder is gone: write nothing anywhere
            hub_file(ref.id, filename, ref.revision, token, local_dir=destination)
        shutil.rmtree(destination / ".cache", ignore_errors=True)

    within_deadline(files, "hub", ref.id)


def fetch_s3(ref: AdapterRef, destination: Path) -> None:
    def files() -> None:
        for filename in ADAPTER_FILES:
            if destination.is_dir():
                s3_file(ref.id, filename, destination / filename)

    within_deadline(files, "s3", ref.id)
