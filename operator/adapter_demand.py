"""Demand-driven replication: how many ring owners a hot adapter needs, from its share of the fleet's requests. Pure.

``warmReplicas`` owners keep an adapter loaded and the gateway sends its requests to the first of them, spilling
to the next only past the load bound, where it is loaded cold. An adapter that takes a large share of the fleet's
traffic needs more: it gets ``ceil(share x ready replicas)`` owners (NVIDIA Dynamo's LoRA controller sizes by
share of load the same way), the operator pre-warms them all, and the gateways spread its requests over them
(least loaded first). ``warmReplicas`` stays the minimum. Extra owners are kept until the demand has been lower for
``release_s`` (the autoscaler's scaleDownDelay), so one quiet interval does not unload what the next needs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping


def request_rates(now: Mapping[str, Mapping[str, float]], before: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Requests answered per adapter name since the previous read, summed over replicas (a counter that went back,
    a restarted replica, counts from zero)."""
    rates: dict[str, float] = {}
    for pod, counts in now.items():
        previous = before.get(pod)
        if previous is None:
            continue
        for name, value in counts.items():
            rates[name] = rates.get(name, 0.0) + max(0.0, value - previous.get(name, 0.0))
    return rates


def owner_counts(rates: Mapping[str, float], replicas: int, names: Mapping[str, int], min_share_requests: float = 10.0) -> dict[str, int]:
    """Owners wanted per registered adapter (``names``: name -> warmReplicas) whose share asks for more than its
    ``warmReplicas``; the base model (name "") and unregistered ids count in the total only. Fewer than
    ``min_share_requests`` requests in the window decide nothing (a share of three requests is noise)."""
    total = sum(rates.values())
    if total < min_share_requests or replicas <= 1:
        return {}
    wanted = {}
    for name, rate in rates.items():
        if name not in names:
            continue
        count = min(replicas, math.ceil(rate / total * replicas - 1e-9))
        if count > max(1, names[name]):
            wanted[name] = count
    return wanted


class OwnerHold:
    """Extra owners, grown at once and released only after ``release_s`` of lower demand."""

    def __init__(self, release_s: float) -> None:
        self.release_s = release_s
        self.current: dict[str, int] = {}
        self._high_at: dict[str, float] = {}

    def update(self, wanted: Mapping[str, int], now: float) -> dict[str, int]:
        for name, count in wanted.items():
            if count >= self.current.get(name, 0):
                self.current[name], self._high_at[name] = count, now
        for name in list(self.current):
            if wanted.get(name, 0) < self.current[name] and now - self._high_at[name] >= self.release_s:
                if wanted.get(name, 0) > 1:
                    self.current[name], self._high_at[name] = wanted[name], now
                else:
                    del self.current[name], self._high_at[name]
        return dict(self.current)
