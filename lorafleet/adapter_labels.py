"""Bounded metric labels for adapters: the busiest ones by name, everything else as ``other``.

A fleet serves thousands of adapters and a client can name any string; one label value per adapter
would grow ``/metrics`` (and Prometheus) without bound. Callers label only adapters that exist (a
request that was served), and ``TopAdapters`` lets at most ``limit`` of them have a series of their
own: the first ``limit`` seen, then, every ``rerank_s``, the ``limit`` with the most traffic since
(counts decay by half each time, so yesterday's hot adapter gives way). An adapter that loses its
place has its series removed (``on_drop``), so the set of label values never exceeds ``limit + 1``.
Traffic is counted with the Space-Saving sketch over ``limit * 8`` candidates, so 10,000 distinct ids
cost a bounded dict, not one entry each.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

OTHER = "other"


def remove_adapter_series(families: Any, adapter: str) -> None:
    """Remove every series of ``families`` (prometheus_client labelled metrics with an ``adapter`` label)
    whose adapter is ``adapter``: what a TopAdapters' ``on_drop`` does."""
    for family in families:
        position = family._labelnames.index("adapter")  # noqa: SLF001 - prometheus_client keeps children by label tuple
        for values in [v for v in list(family._metrics) if v[position] == adapter]:  # noqa: SLF001
            family.remove(*values)


class TopAdapters:
    def __init__(self, limit: int = 32, rerank_s: float = 60.0, on_drop: Callable[[str], None] = lambda label: None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1:
            raise ValueError("the number of adapter labels must be at least 1")
        self.limit, self.rerank_s, self.on_drop, self.clock = limit, rerank_s, on_drop, clock
        self.capacity = limit * 8
        self.counts: dict[str, float] = {}
        self.labelled: set[str] = set()
        self._next_rerank = clock() + rerank_s
        self._lock = threading.Lock()  # the replica labels from the event loop and the engine thread

    def label(self, adapter: str) -> str:
        """The label value for one more request of ``adapter`` (an adapter that exists; "" is the base model)."""
        if not adapter:
            return ""
        with self._lock:
            self._count(adapter)
            if adapter not in self.labelled and len(self.labelled) < self.limit:
                self.labelled.add(adapter)
            dropped = self._rerank() if self.clock() >= self._next_rerank else []
            result = adapter if adapter in self.labelled else OTHER
        for name in dropped:
            self.on_drop(name)
        return result

    def _count(self, adapter: str) -> None:
        if adapter in self.counts:
            self.counts[adapter] += 1
        elif len(self.counts) < self.capacity:
            self.counts[adapter] = 1
        else:  # Space-Saving: the newcomer inherits the smallest count, an overestimate at most by it
            smallest = min(self.counts, key=self.counts.__getitem__)
            self.counts[adapter] = self.counts.pop(smallest) + 1

    def _rerank(self) -> list[str]:
        self._next_rerank = self.clock() + self.rerank_s
        top = set(sorted(self.counts, key=lambda a: (-self.counts[a], a))[: self.limit])
        dropped = sorted(self.labelled - top)  # an adapter in both keeps its series: they move only when the ranking does
        self.labelled = top
        for adapter in self.counts:
            self.counts[adapter] /= 2
        return dropped
