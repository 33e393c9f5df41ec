"""What `lorafleet status` shows per replica, read from its /metrics: requests/s, adapter hit rate,
resident adapters and queue. Two scrapes ``interval`` apart give the rate; the rest is the second scrape."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from lorafleet.replica_metrics import COLD_LOAD_EVENTS, samples


@dataclass
class ReplicaStats:
    requests_per_s: float
    hit_rate: float | None  # share of adapter requests that found their adapter on the device (None: none yet)
    resident: int
    slots: int
    queue: int

    def columns(self) -> str:
        hits = "-" if self.hit_rate is None else f"{self.hit_rate:.0%}"
        return f"{self.requests_per_s:<8.1f} {hits:<6} {f'{self.resident}/{self.slots}':<9} {self.queue}"


def read_metrics(url: str) -> str | None:
    try:
        response = httpx.get(url + "/metrics", timeout=2)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None


def _generate_requests(values: dict[tuple[str, tuple], float]) -> float:
    return sum(v for (name, labels), v in values.items() if name == "lorafleet_requests_total" and dict(labels).get("route") != "other")


def stats(before: str, after: str, interval: float) -> ReplicaStats:
    first, second = samples(before), samples(after)

    def event(name: str) -> float:
        return second.get(("lorafleet_adapter_events", (("event", name),)), 0.0)

    hits, loads = event("device_hit"), sum(event(name) for name in COLD_LOAD_EVENTS)
    return ReplicaStats(
        requests_per_s=max(0.0, _generate_requests(second) - _generate_requests(first)) / interval,
        hit_rate=hits / (hits + loads) if hits + loads else None,
        resident=int(second.get(("lorafleet_adapter_tier_adapters", (("tier", "device"),)), 0)),
        slots=int(second.get(("lorafleet_adapter_slots", ()), 0)),
        queue=int(second.get(("lorafleet_queue_size", ()), 0)),
    )


def replica_stats(urls: dict[str, str], interval: float, read: Callable[[str], str | None] = read_metrics,
                  sleep: Callable[[float], None] | None = None) -> dict[str, ReplicaStats | None]:
    """Stats per replica name (None: its /metrics did not answer)."""
    first = {name: read(url) for name, url in urls.items()}
    (sleep or time.sleep)(interval)
    out: dict[str, ReplicaStats | None] = {}
    for name, url in urls.items():
        second = read(url)
        out[name] = stats(first[name], second, interval) if first[name] is not None and second is not None else None
    return out
