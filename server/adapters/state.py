"""What the adapter manager keeps per adapter, its settings, and how long a failure is remembered."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.adapter_ref import AdapterRef
from lorafleet.backoff import Backoff
from lorafleet.server.adapters.sources import AdapterFetchError, AdapterNotFound

MAX_BACKOFF_S = 30.0
NOT_FOUND_RETRY_S = 30.0  # an id its source says does not exist is refused from memory for this long
TIERS = ("device", "loading", "cpu", "failed")  # every AdapterState.status


@dataclass(slots=True)
class AdapterState:
    ref: AdapterRef
    status: str = "loading"  # one of TIERS
    pinned: bool = False
    error: BaseException | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_used: float = field(default_factory=time.monotonic)
    resident_since: float = 0.0
    ran_since_load: bool = False  # a request has run a step with it since it last entered a slot
    draining: bool = False
    rank: int = 0
    size_bytes: int = 0
    tier_hit: str = ""  # where the last load found it: cpu | local | disk | source | merge
    load_seconds: dict[str, float] = field(default_factory=dict)
    digest: str | None = None  # of the weights as loaded (digest_of): what this version's name serves right now


def digest_of(fingerprint: bytes) -> str:
    """An adapter's content digest as the listing and the Adapter status show it: its weights' fingerprint (the key its
    cached KV blocks carry), so two replicas serving one version show one digest, and changed files a new one."""
    return "blake2b:" + fingerprint.hex()


@dataclass(slots=True)
class AdapterSettings:
    """What the manager needs of EngineConfig (whose defaults these are), plus its own thread counts."""

    roots: list[Path]
    cache_dir: Path
    disk_bytes: int
    cpu_bytes: int
    cycle_time_s: float
    load_threads: int = 2  # local folders: parsing only
    remote_load_threads: int = 4  # hub and S3: network-bound, so a slow or unreachable source never holds up local loads
    max_pinned: int | None = None  # None: no limit (tests); the engine keeps one slot free of pins


FETCH_BACKOFF = Backoff(1.0, MAX_BACKOFF_S)


def retry_delay(exc: BaseException, failures: int) -> float:
    """How long a failed id is answered from memory: a missing one for a while, an unreachable source
    with a back-off from 1 s, anything else (a bad file, since replaced?) at once the first time."""
    if isinstance(exc, AdapterNotFound):
        return NOT_FOUND_RETRY_S
    if isinstance(exc, AdapterFetchError):
        return FETCH_BACKOFF.delay(failures)
    return 0.0 if failures == 1 else FETCH_BACKOFF.delay(failures - 1)
