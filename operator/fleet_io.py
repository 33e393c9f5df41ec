"""What a fleet sees of its replica pods, and what it does outside itself (API writes, replica calls, Events)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from lorafleet.operator.fleet_status import ready_pods
from lorafleet.operator.replica_client import ReplicaCalls


@dataclass(frozen=True)
class PodView:
    """A replica pod as the fleet needs it: where to call it, and what tells that it restarted."""

    name: str
    url: str | None  # None while it is not Ready
    uid: str
    restarts: int

    @classmethod
    def from_body(cls, body: Any) -> PodView:
        raw = {"metadata": dict(body["metadata"]), "spec": dict(body.get("spec") or {}), "status": dict(body.get("status") or {})}
        url = ready_pods([raw]).get(raw["metadata"]["name"])
        restarts = sum(c.get("restartCount", 0) for c in raw["status"].get("containerStatuses") or [])
        return cls(raw["metadata"]["name"], url, raw["metadata"].get("uid", ""), restarts)


@dataclass
class FleetIO:
    """What a fleet does outside itself; the handlers give real ones, a test may give stand-ins."""

    kube: Any  # lorafleet.operator.kube.Kube (blocking: called on ``executor``)
    executor: Executor  # API writes and validation fetches
    calls: ReplicaCalls
    event: Callable[[dict[str, Any], str, str, str], None]  # (object, type, reason, message)
    admin_headers: Callable[[], dict[str, str]]  # blocking
