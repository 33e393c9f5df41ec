"""A fleet's autoscaler at work: read the replicas' /metrics every interval, decide (autoscaler.py), write spec.replicas.

The replicas' own counters are the signals (``lorafleet_requests_in_flight``, which counts queued requests too,
``lorafleet_kv_cache_usage_ratio``, the cold-load events of ``lorafleet_adapter_events`` per
``lorafleet_adapter_slots``, ``lorafleet_requests_total`` for what was answered). A fleet at zero has no replica to
ask: its gateways say there is demand by stamping the BaseModel's ``lorafleet.io/demand-at`` annotation when a
request arrives and no replica is ready, and that event wakes this loop at once (not on its next tick).

The decision is written where ``kubectl scale`` writes (``spec.replicas``, the scale subresource's path), so the
BaseModel handler rolls it into the Deployment as any other change; ``status.autoscaling`` records the last
decision, and an Event says why. History lives in memory: after an operator restart the scale-down window starts
afresh (no scale-down for ``scaleDownDelay``) and the fleet counts as just used (no scale to zero for
``idleToZero``), which errs on the side of capacity; so does turning autoscaling on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lorafleet.operator.adapter_demand import OwnerHold, owner_counts, request_rates
from lorafleet.operator.autoscaler import Decision, Policy, Sample, decide
from lorafleet.operator.wakeable import Wakeable
from lorafleet.replica_metrics import COLD_LOAD_EVENTS, samples
from lorafleet.timestamps import now_text

log = logging.getLogger(__name__)
GROUP_VERSION = "lorafleet.io/v1alpha1"
DEMAND_ANNOTATION = "lorafleet.io/demand-at"
IDLE_POLL_S = 30.0  # how often a fleet without autoscaling looks whether it was turned on (an update also wakes it)


@dataclass(frozen=True)
class Reading:
    """One replica's counters at one time."""
    requests: float  # in flight (queued ones included)
    kv_usage: float
    cold_loads: float  # cumulative
    slots: float
    served: float  # cumulative answers
    by_adapter: dict[str, float]  # cumulative answers by the adapter's registered name ("" the base model; busiest only)


def reading(text: str) -> Reading | None:
    """None for what is not a Prometheus exposition (that replica is left out of the round)."""
    try:
        values = samples(text)
    except ValueError:
        return None

    def total(name: str, keep: Callable[[dict], bool] = lambda _: True) -> float:
        return sum(v for (n, labels), v in values.items() if n == name and keep(dict(labels)))

    answered = by_adapter(values)
    # requests_in_flight counts every request the replica holds, those queued in the engine included.
    return Reading(requests=total("lorafleet_requests_in_flight"),
                   kv_usage=total("lorafleet_kv_cache_usage_ratio"),
                   cold_loads=total("lorafleet_adapter_events", lambda labels: labels.get("event") in COLD_LOAD_EVENTS),
                   slots=total("lorafleet_adapter_slots"),
                   served=sum(answered.values()),
                   by_adapter=answered)


def by_adapter(values: dict[tuple[str, tuple], float]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for (name, labels), value in values.items():
        labels_ = dict(labels)
        if name == "lorafleet_requests_total" and labels_.get("route") != "other":
            counts[labels_.get("adapter", "")] = counts.get(labels_.get("adapter", ""), 0.0) + value
    return counts


def fleet_sample(now: dict[str, Reading], before: dict[str, Reading], elapsed_s: float, at: float, demand: bool) -> Sample:
    """The fleet's sample from this round's readings and the previous round's (a replica seen once counts no rates)."""
    served = cold = 0.0
    for name, r in now.items():
        if name in before:  # a restarted replica's counters start again: never a negative rate
            served += max(0.0, r.served - before[name].served)
            cold += max(0.0, r.cold_loads - before[name].cold_loads)
    slots = sum(r.slots for r in now.values()) or 1.0
    return Sample(at=at, replicas=len(now), requests=sum(r.requests for r in now.values()),
                  kv_usage=sum(r.kv_usage for r in now.values()) / len(now) if now else 0.0,
                  cold_loads_per_slot_per_minute=cold / slots / max(elapsed_s, 1e-3) * 60.0,
                  served=served + (1.0 if demand else 0.0))


class AutoscaleLoop(Wakeable):
    def __init__(self, namespace: str, name: str, kube: Any, executor: Any, calls: Any, event: Callable[..., None],
                 adapters: Callable[[], dict[str, int]] = dict, on_owners: Callable[[dict[str, int]], None] | None = None) -> None:
        super().__init__()
        self.namespace, self.name, self.kube, self.executor, self.calls, self.event = namespace, name, kube, executor, calls, event
        self.adapters, self.on_owners = adapters, on_owners  # registered names -> warmReplicas; where hot adapters' owner counts go
        self._owners: OwnerHold | None = None
        self._history: list[tuple[Sample, int]] = []
        self._before: dict[str, Reading] = {}
        self._before_at: float | None = None
        self._last_request_at = time.monotonic()  # a (re)started operator counts the fleet as just used
        self._demand_seen: str | None = None
        self._demand = False
        self.last: Decision | None = None
        self.settings_seen: dict[str, Any] | None = None  # spec.autoscaling as the last BaseModel event had it
        self._enabled = False

    def demand_stamped(self, stamp: str | None) -> None:
        """A gateway stamped the BaseModel (a request found no ready replica): count it as demand, and act now."""
        if stamp and stamp != self._demand_seen:
            self._demand_seen, self._demand = stamp, True
            self.wake_up()

    async def run(self, spec: Callable[[], dict[str, Any]], pods: Callable[[], list[Any]], stopped: Any) -> None:
        self._loop = asyncio.get_running_loop()
        while not stopped:
            self.wake.clear()
            settings = dict(spec().get("autoscaling") or {})
            wait = IDLE_POLL_S
            if settings.get("enabled") and not self._enabled:  # just turned on: idle and the windows count from now
                self._last_request_at, self._history, self._before, self._before_at = time.monotonic(), [], {}, None
            self._enabled = bool(settings.get("enabled"))
            if not self._enabled and self._owners is not None:  # turned off: hot adapters go back to warmReplicas
                self._owners = None
                if self.on_owners is not None:
                    self.on_owners({})
            if settings.get("enabled"):
                try:
                    policy = Policy.from_spec(settings)
                    wait = policy.interval_s
                    await self.tick(policy, int(spec().get("replicas", 1)), pods())
                except ValueError as exc:  # a duration the schema let through but the policy cannot read
                    log.warning("autoscaling of %s/%s: %s", self.namespace, self.name, exc)
                except Exception:  # an API hiccup: the next tick tries again
                    log.exception("autoscaling of %s/%s: tick failed", self.namespace, self.name)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), wait)

    async def tick(self, policy: Policy, current: int, pods: list[Any]) -> Decision:
        urls = {p.name: p.url for p in pods if p.url}
        texts = await asyncio.gather(*(self.calls.metrics(url) for url in urls.values()))
        read = {name: reading(text) for name, text in zip(urls, texts) if text is not None}
        now = {name: r for name, r in read.items() if r is not None}
        at = time.monotonic()
        demand, self._demand = self._demand, False
        sample = fleet_sample(now, self._before, at - (self._before_at or at), at, demand)
        rates = request_rates({pod: r.by_adapter for pod, r in now.items()}, {pod: r.by_adapter for pod, r in self._before.items()})
        self._before, self._before_at = now, at
        if self.on_owners is not None:  # demand-driven replication: a hot adapter on as many owners as its share asks
            if self._owners is None or self._owners.release_s != policy.scale_down_s:
                self._owners = OwnerHold(policy.scale_down_s)
            self.on_owners(self._owners.update(owner_counts(rates, max(current, len(now)), self.adapters()), at))
        if sample.requests or sample.served:
            self._last_request_at = at
        decision = decide(policy, current, self._history, sample, self._last_request_at)
        keep_s = max(policy.scale_down_s, policy.scale_up_s) + policy.interval_s
        self._history = [(s, w) for s, w in self._history if at - s.at <= keep_s] + [(sample, decision.wanted)]
        if decision.replicas != current:
            await self._scale(current, decision)
        self.last = decision
        return decision

    async def _scale(self, current: int, decision: Decision) -> None:
        status = {"autoscaling": {"desiredReplicas": decision.replicas, "lastScaleTime": now_text(), "reason": decision.reason}}

        def write() -> Any:
            self.kube.merge(GROUP_VERSION, "BaseModel", self.namespace, self.name, {"spec": {"replicas": decision.replicas}})
            self.kube.merge_status(GROUP_VERSION, "BaseModel", self.namespace, self.name, status)
            return self.kube.get(GROUP_VERSION, "BaseModel", self.namespace, self.name)

        body = await asyncio.get_running_loop().run_in_executor(self.executor, write)
        log.info("autoscaling %s/%s: %d -> %d (%s)", self.namespace, self.name, current, decision.replicas, decision.reason)
        if body is not None:
            self.event(body, "Normal", "Scaled", f"{current} -> {decision.replicas} replicas: {decision.reason}")
