"""How many replicas a fleet needs, from what its replicas report: a pure function of samples and the spec.

Signals, per replica from its own /metrics (the operator reads them every ``interval``):
- requests in flight plus queued, against ``targetRequestsPerReplica`` (KubeAI scales on the same count, at its
  proxy): the demand the fleet is serving now;
- KV-cache usage, against ``targetKvUsage`` (llm-d treats a replica as saturated at 0.8): long contexts fill a
  replica before its request count says so;
- cold adapter loads per device slot per minute, against ``maxColdLoadsPerSlotPerMinute``: a fleet thrashing its
  slots (more hot adapters than slots) needs more replicas even at modest request rates — no autoscaler of the
  anchors looks at this, and it is the LoRA fleet's own failure.

Each sample gives a wanted count; the decision damps it as the HPA does: up at once (after
``scaleUpStabilization``), at most doubling or +4 a step; down only to the largest count wanted over the last
``scaleDownDelay``, so a steady load never flaps; to zero only when ``minReplicas`` is 0 and no request was seen
for ``idleToZero``. Everything is clamped to [minReplicas, maxReplicas].
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lorafleet.operator.rollout import parse_duration

TOLERANCE = 0.1  # as the HPA's: a scale-down needs the load 10 % under the smaller fleet's target


@dataclass(frozen=True)
class Policy:
    min_replicas: int = 1
    max_replicas: int = 10
    target_requests: float = 8.0
    target_kv_usage: float = 0.8
    max_cold_loads: float = 2.0  # per slot per minute
    scale_up_s: float = 0.0
    scale_down_s: float = 300.0
    idle_to_zero_s: float = 900.0
    interval_s: float = 15.0

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Policy:
        return cls(int(spec.get("minReplicas", 1)), int(spec.get("maxReplicas", 10)), float(spec.get("targetRequestsPerReplica", 8)),
                   float(spec.get("targetKvUsage", 0.8)), float(spec.get("maxColdLoadsPerSlotPerMinute", 2)),
                   parse_duration(spec.get("scaleUpStabilization"), 0.0), parse_duration(spec.get("scaleDownDelay"), 300.0),
                   parse_duration(spec.get("idleToZero"), 900.0), parse_duration(spec.get("interval"), 15.0))


@dataclass(frozen=True)
class Sample:
    """The fleet as read at ``at`` (monotonic seconds): sums and means over the replicas that answered."""
    at: float
    replicas: int  # replicas that answered
    requests: float  # in flight + queued, summed
    kv_usage: float  # mean KV usage, 0..1
    cold_loads_per_slot_per_minute: float
    served: float  # requests answered since the previous sample (or any sign of demand: waiting at a gateway)


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str
    wanted: int  # what this sample alone asks for, with the scale-down slack (what the history keeps)


def wanted(policy: Policy, sample: Sample, slack: float = 1.0) -> tuple[int, str]:
    """What one sample asks for, and which signal asked. ``slack`` > 1 inflates the load (scale-down decisions use
    1 + TOLERANCE: a load that sits at a threshold does not go down and up by turns)."""
    by_requests = math.ceil(sample.requests * slack / policy.target_requests) if sample.requests > 0 else 0
    answering = max(1, sample.replicas)
    kv = sample.kv_usage * slack
    by_kv = math.ceil(answering * kv / policy.target_kv_usage) if kv > policy.target_kv_usage else 0
    by_thrash = answering + 1 if sample.cold_loads_per_slot_per_minute > policy.max_cold_loads else 0
    demand = max(by_requests, by_kv, by_thrash)
    reasons = [f"{sample.requests:g} requests in flight or queued (target {policy.target_requests:g} a replica)" if demand == by_requests else None,
               f"KV usage {sample.kv_usage:.0%} over {policy.target_kv_usage:.0%}" if by_kv and demand == by_kv else None,
               f"{sample.cold_loads_per_slot_per_minute:.1f} cold loads a slot a minute over {policy.max_cold_loads:g}" if by_thrash and demand == by_thrash else None]
    return demand, next((r for r in reasons if r), "no demand")


def decide(policy: Policy, current: int, history: list[tuple[Sample, int]], sample: Sample, last_request_at: float | None) -> Decision:
    """The replicas to run after ``sample``. ``history``: earlier (sample, wanted) pairs, oldest first (the caller keeps
    ``scaleDownDelay`` of them); ``last_request_at``: when demand was last seen (None: never)."""
    want, reason = wanted(policy, sample)
    keep = min(policy.max_replicas, max(wanted(policy, sample, 1 + TOLERANCE)[0], policy.min_replicas, 1))
    idle = sample.requests == 0 and sample.served == 0 and (last_request_at is None or sample.at - last_request_at >= policy.idle_to_zero_s)
    if policy.min_replicas == 0 and idle:
        return Decision(0, f"no request for {policy.idle_to_zero_s:g} s (minReplicas 0)", 0)
    want = min(policy.max_replicas, max(want, policy.min_replicas, 1))
    if want > current:
        if policy.scale_up_s > 0:  # up only once every sample of the last scaleUpStabilization wanted more
            window = [(s.at, w) for s, w in history if sample.at - s.at <= policy.scale_up_s]
            if not window or sample.at - window[0][0] < policy.scale_up_s or min(w for _, w in window) <= current:
                return Decision(current, f"holding for scaleUpStabilization ({reason})", keep)
        step = min(want, max(current * 2, current + 4))  # as the HPA: at most doubling, or +4, a step
        return Decision(step, f"up: {reason}", keep)
    window = [w for s, w in history if sample.at - s.at <= policy.scale_down_s]
    spanned = bool(history) and sample.at - history[0][0].at >= policy.scale_down_s
    target = max([keep, *window])
    if target < current and spanned:
        return Decision(target, f"down: {reason}, for {policy.scale_down_s:g} s", keep)
    return Decision(current, f"steady: {reason}", keep)
