"""Each adapter version's outcomes on this replica, for the operator's canary analysis (GET /adapters/stats).

Prometheus series carry the same facts, but their adapter label is bounded to the busiest few dozen adapters (the
rest are ``other``), and a rollout's canary is by definition not yet busy. These counters are kept for the most
recently used ``limit`` versions, exactly, and read by version.
"""

from __future__ import annotations

from collections import OrderedDict

from lorafleet.traffic_split import VersionCounts

DEFAULT_LIMIT = 4096
# Statuses that count against a version: the server failed (5xx) or the model produced nothing usable (424). A 4xx
# is the caller's request, a 499 the caller leaving: neither says anything about the version.
ERROR_STATUSES = frozenset({424}) | frozenset(range(500, 600))


class VersionTally:
    def __init__(self, limit: int = DEFAULT_LIMIT) -> None:
        self.limit = limit
        self._counts: OrderedDict[str, VersionCounts] = OrderedDict()

    def _of(self, version: str) -> VersionCounts:
        counts = self._counts.get(version)
        if counts is None:
            counts = self._counts[version] = VersionCounts()
            if len(self._counts) > self.limit:
                self._counts.popitem(last=False)
        else:
            self._counts.move_to_end(version)
        return counts

    def answered(self, version: str, status: int) -> None:
        """One request for ``version`` (its ring key) ended with ``status``."""
        if not version or status == 499:
            return
        counts = self._of(version)
        counts.requests += 1
        counts.errors += status in ERROR_STATUSES

    def first_token(self, version: str, seconds: float) -> None:
        if version:
            self._of(version).observe_ttft(seconds)

    def read(self, versions: list[str]) -> dict[str, dict]:
        """The counters of ``versions`` that have any, as ``VersionCounts.wire`` writes them."""
        return {v: self._counts[v].wire() for v in versions if v in self._counts}
