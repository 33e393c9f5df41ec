"""How many adapter loads may wait, and which sources are down: the bounds a flood of ids or merge specs meets.

Remote fetches and merges queue on thread pools of their own; each queue is bounded (a new id past it is a 429) and
merges are also bounded per identified caller (the gateway's cache salt, one per API key), so one key cannot hold
every merge place. A source a fetch found unreachable fails new fetches at once for a while: a dead hub costs one
fetch's deadline, not one per junk id. The engine thread admits; loader threads release and report sources; so the
counts sit under one lock.
"""

from __future__ import annotations

import threading
import time

from lorafleet.server.adapters.sources import SOURCE_NAMES, SourceUnreachable
from lorafleet.server.errors import Overloaded

SOURCE_DOWN_S = 15.0  # after a fetch finds its source unreachable, new fetches from it fail at once this long
MAX_PENDING_FETCHES = 64  # hub/S3 loads queued or running; beyond it a new id is refused (429)
MAX_PENDING_MERGES = 4
MAX_PENDING_MERGES_PER_CALLER = 2  # a caller the gateway identified (its cache salt) holds at most half the merge queue


class LoadAdmission:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.pending_fetches = 0
        self.pending_merges = 0
        self._merges_by_caller: dict[bytes, int] = {}
        self._source_down: dict[str, tuple[float, BaseException]] = {}  # source -> (until, why)

    # -- fetches --------------------------------------------------------------------------------

    def admit_fetch(self, source: str, adapter_id: str) -> None:
        """Refuse a new remote load while its source is known to be down or its queue is full. The error names this
        request's adapter only: why the source went down is another client's fetch."""
        down = self.source_down(source, adapter_id)
        if down is not None:
            raise down
        if self.pending_fetches >= MAX_PENDING_FETCHES:
            raise Overloaded(f"{self.pending_fetches} adapter fetches are already pending; try again shortly")

    def fetch_started(self) -> None:
        with self._lock:
            self.pending_fetches += 1

    def fetch_ended(self) -> None:
        with self._lock:
            self.pending_fetches -= 1

    def source_down(self, source: str, adapter_id: str) -> SourceUnreachable | None:
        until, _ = self._source_down.get(source, (0.0, None))
        now = time.monotonic()
        if now >= until:
            return None
        return SourceUnreachable(f"{source} adapter {adapter_id!r}: {SOURCE_NAMES.get(source, source)} is unreachable "
                                 f"(a fetch from it failed; not tried again for {until - now:.0f}s)")

    def mark_down(self, source: str, why: BaseException) -> None:
        with self._lock:
            self._source_down[source] = (time.monotonic() + SOURCE_DOWN_S, why)

    def mark_up(self, source: str) -> None:
        with self._lock:
            self._source_down.pop(source, None)

    # -- merges ---------------------------------------------------------------------------------

    def admit_merge(self, caller: bytes) -> None:
        if self.pending_merges >= MAX_PENDING_MERGES:
            raise Overloaded(f"{self.pending_merges} adapter merges are already running or queued; try again shortly")
        if caller and self._merges_by_caller.get(caller, 0) >= MAX_PENDING_MERGES_PER_CALLER:
            raise Overloaded(f"this caller has {MAX_PENDING_MERGES_PER_CALLER} adapter merges running or queued already; "
                             "try again when one is done")

    def merge_started(self, caller: bytes) -> None:
        with self._lock:
            self.pending_merges += 1
            if caller:
                self._merges_by_caller[caller] = self._merges_by_caller.get(caller, 0) + 1

    def merge_ended(self, caller: bytes) -> None:
        with self._lock:
            self.pending_merges -= 1
            if caller:
                left = self._merges_by_caller.pop(caller) - 1
                if left:
                    self._merges_by_caller[caller] = left
