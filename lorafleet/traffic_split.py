"""A canary's share of an adapter name's traffic, and the counts that judge it. Torch-free; shared by three processes.

The operator decides the split (operator/rollout.py), writes it into the catalogue entry of the Adapter's name, and
every gateway applies it per request: the name's stable version or its canary, the chosen version's ring key routes
the request, and ``VARIANT_HEADER`` names that version to the replica, whole. Every request for a registered name
carries it, stable side too: a replica resolves names from its own copy of the catalogue, which may reach it a
moment before or after the gateway's, and without the header a request routed by the old version's key to the old
version's owner was served the new version there, cold, in the second the two copies differed (seen on `lorafleet
up` at a promotion). The gateway strips a client's copy of the header; a caller reaching a replica directly gains
nothing by it, as it may name any version by its id.

Stickiness: a caller identified by its API key or by a header always lands on the same side for a given canary, and
a step that raises the weight only moves callers from stable to canary, never back (the caller's point on [0, 1) is
fixed; the threshold grows). Without an identity each request draws afresh.

``VersionCounts`` is what a replica counts per version for the analysis: requests, errors, and time to first token
in fine buckets (each 25 % wider than the last, so a p95 read from them is within 25 % of the true one).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lorafleet.adapter_ref import AdapterRef

VARIANT_HEADER = "x-lorafleet-version"  # the version a gateway routed a registered name by: {"id", "source", "revision"}
STICKINESS = ("none", "apiKey", "header")
DEFAULT_STICKY_HEADER = "x-session-id"
# Time-to-first-token bucket bounds in seconds: 1 ms growing by 25 % to about 10 minutes (60 buckets + overflow).
TTFT_BOUNDS: tuple[float, ...] = tuple(0.001 * 1.25 ** i for i in range(60))


def version_header(ref: AdapterRef) -> bytes:
    """``VARIANT_HEADER``'s value for a version: compact ASCII JSON (non-ASCII ids escaped)."""
    return json.dumps(ref.fields(), separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Split:
    """The canary of one name, and the percentage of the name's requests it takes."""

    canary: AdapterRef
    weight: float  # 0..100
    stickiness: str = "none"
    header: str = DEFAULT_STICKY_HEADER

    def entry(self) -> dict[str, Any]:
        """The ``canary`` field of the name's catalogue entry."""
        return {**self.canary.fields(), "weight": self.weight, "stickiness": self.stickiness, "header": self.header}

    @classmethod
    def from_entry(cls, entry: Any) -> Split | None:
        """The split a catalogue entry's ``canary`` field describes; None when absent; ValueError when malformed."""
        if entry is None:
            return None
        if not isinstance(entry, Mapping):
            raise ValueError("`canary` must be an object")
        weight = entry.get("weight")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
            raise ValueError(f"`canary.weight` must be a number from 0 to 100, got {weight!r}")
        stickiness = entry.get("stickiness") or "none"
        if stickiness not in STICKINESS:
            raise ValueError(f"`canary.stickiness` must be one of {', '.join(STICKINESS)}, got {stickiness!r}")
        header = entry.get("header") or DEFAULT_STICKY_HEADER
        if not isinstance(header, str) or not header.isascii() or len(header) > 128:
            raise ValueError("`canary.header` must be a header name")
        return cls(AdapterRef.from_entry(entry), float(weight), stickiness, header.lower())

    def takes(self, name: str, caller: str | None) -> bool:
        """Whether this request for ``name`` goes to the canary; ``caller`` is the sticky identity, if there is one."""
        if self.weight <= 0:
            return False
        if self.weight >= 100:
            return True
        if caller is None or self.stickiness == "none":
            point = random.random()
        else:
            digest = hashlib.blake2b(f"{name}\0{self.canary.ring_key}\0{caller}".encode("utf-8", "surrogateescape"), digest_size=8).digest()
            point = int.from_bytes(digest, "big") / 2**64
        return point * 100 < self.weight


@dataclass(slots=True)
class VersionCounts:
    """One version's outcomes: requests answered, errors among them (5xx, 424), and first-token times of successes."""

    requests: int = 0
    errors: int = 0
    ttft: list[int] = field(default_factory=lambda: [0] * (len(TTFT_BOUNDS) + 1))

    def observe_ttft(self, seconds: float) -> None:
        self.ttft[bisect.bisect_left(TTFT_BOUNDS, seconds)] += 1

    def since(self, earlier: VersionCounts | None) -> VersionCounts:
        """What happened after ``earlier`` (the same counters read before); a replica that restarted counts from zero."""
        if earlier is None or earlier.requests > self.requests or earlier.errors > self.errors:
            return self
        return VersionCounts(self.requests - earlier.requests, self.errors - earlier.errors, [a - b for a, b in zip(self.ttft, earlier.ttft)])

    def plus(self, other: VersionCounts) -> VersionCounts:
        return VersionCounts(self.requests + other.requests, self.errors + other.errors, [a + b for a, b in zip(self.ttft, other.ttft)])

    @property
    def error_ratio(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def ttft_quantile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-quantile of first-token times; None without any."""
        total = sum(self.ttft)
        if not total:
            return None
        rank, seen = q * total, 0
        for index, count in enumerate(self.ttft):
            seen += count
            if seen >= rank:
                return TTFT_BOUNDS[index] if index < len(TTFT_BOUNDS) else float("inf")
        return float("inf")

    def wire(self) -> dict[str, Any]:
        return {"requests": self.requests, "errors": self.errors, "ttft": list(self.ttft)}

    @classmethod
    def from_wire(cls, body: Any) -> VersionCounts:
        """ValueError when ``body`` is not what ``wire`` writes."""
        if not isinstance(body, Mapping):
            raise ValueError("counts must be an object")
        requests, errors, ttft = body.get("requests"), body.get("errors"), body.get("ttft")
        if not (isinstance(requests, int) and isinstance(errors, int) and isinstance(ttft, list) and len(ttft) == len(TTFT_BOUNDS) + 1
                and all(isinstance(c, int) for c in ttft)):
            raise ValueError("counts need integer requests, errors and ttft buckets")
        return cls(requests, errors, list(ttft))
