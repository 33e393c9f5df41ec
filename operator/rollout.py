"""An Adapter update as a canary: its policy (``spec.rollout``), where it stands, and the analysis that moves it. Pure.

An update (a new ``revision``, ``id`` or ``source``) is first warmed on every owner of the new version, as any
update is. Without ``spec.rollout.steps`` the name then moves to it at once. With steps, the gateways send each
step's ``weight`` percent of the name's requests to the new version (the canary) for the step's ``pause``, while
the operator compares the canary's counts with the stable version's over the step (read from the replicas, which
count both exactly): the canary fails when its error ratio exceeds stable's by more than ``maxErrorRatio``, or its
time-to-first-token p95 is more than ``maxTtftP95Ratio`` times stable's plus ``ttftSlack`` (50 ms: on `lorafleet up`
a healthy canary on another replica measured 56 ms against stable's 15 ms, 3.8x, and was rolled back without it). A failure rolls back at once (the name
goes back to stable everywhere; the canary is unloaded); a step passes when its pause is over and the canary has
answered ``minRequests`` (an idle adapter's step waits, and says so, until it has, or someone promotes it). The last
step passing promotes the canary. ``spec.rollout.paused`` holds the current step; the annotation
``lorafleet.io/rollout-action`` set to ``promote`` or ``abort`` ends the rollout either way, and is then removed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from lorafleet.adapter_ref import AdapterRef
from lorafleet.traffic_split import DEFAULT_STICKY_HEADER, Split, VersionCounts

ACTION_ANNOTATION = "lorafleet.io/rollout-action"
ACTIONS = ("promote", "abort")
ACTIVE = ("Warming", "Progressing", "Paused")
ENDED = ("Promoted", "RolledBack", "Aborted")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)$")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, default: float) -> float:
    """Seconds from a Kubernetes-style duration (``90s``, ``2m``, ``1h``, ``500ms``) or a number of seconds."""
    if value is None:
        return default
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"{value!r} is not a duration (e.g. 30s, 2m, 1h)")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True)
class Step:
    weight: float  # percent of the name's requests the canary takes
    pause_s: float


@dataclass(frozen=True)
class Analysis:
    max_error_ratio: float = 0.05
    max_ttft_p95_ratio: float = 2.0
    ttft_slack_s: float = 0.05  # a p95 this much over stable's x ratio is noise (bucket width, replica to replica), not a regression
    min_requests: int = 20
    interval_s: float = 10.0  # how often the replicas' counters are read while a canary takes traffic


@dataclass(frozen=True)
class Policy:
    steps: tuple[Step, ...] = ()  # none: move the name to the new version as soon as it is hot on every owner
    analysis: Analysis = Analysis()
    stickiness: str = "none"
    header: str = DEFAULT_STICKY_HEADER
    paused: bool = False

    @classmethod
    def from_spec(cls, spec: Any) -> Policy:
        """``spec.rollout`` (validated by the CRD's schema; ValueError names what is still wrong)."""
        if not spec:
            return cls()
        steps = tuple(Step(float(s["weight"]), parse_duration(s.get("pause"), 60.0)) for s in spec.get("steps") or ())
        a = spec.get("analysis") or {}
        analysis = Analysis(float(a.get("maxErrorRatio", 0.05)), float(a.get("maxTtftP95Ratio", 2.0)), parse_duration(a.get("ttftSlack"), 0.05),
                            int(a.get("minRequests", 20)), parse_duration(a.get("interval"), 10.0))
        stickiness = spec.get("stickiness") or "none"
        return cls(steps, analysis, stickiness, (spec.get("stickyHeader") or DEFAULT_STICKY_HEADER).lower(), bool(spec.get("paused")))


@dataclass
class Rollout:
    """One update of one Adapter: ``stable`` serves the name, ``canary`` is the spec's version."""

    stable: AdapterRef
    canary: AdapterRef
    phase: str = "Warming"
    step: int = 0
    step_started: float = 0.0  # monotonic
    reason: str = "Warming"
    message: str = ""
    window: tuple[VersionCounts, VersionCounts] | None = None  # (canary, stable) over the current step, last read
    baseline: dict[str, dict[str, VersionCounts]] | None = field(default=None, repr=False)  # pod -> version -> counts at the step's start

    def weight(self, policy: Policy) -> float:
        if self.phase in ("Progressing", "Paused"):
            return policy.steps[min(self.step, len(policy.steps) - 1)].weight
        return 100.0 if self.phase == "Promoted" else 0.0

    def split(self, policy: Policy) -> Split | None:
        """What the gateways apply to the name now (None: all of it to stable)."""
        if self.phase not in ("Progressing", "Paused"):
            return None
        return Split(self.canary, self.weight(policy), policy.stickiness, policy.header)

    def status(self, policy: Policy) -> dict[str, Any]:
        canary, stable = self.window or (VersionCounts(), VersionCounts())
        return {"phase": self.phase, "stable": self.stable.ring_key, "canary": self.canary.ring_key, "step": min(self.step + 1, len(policy.steps)),
                "steps": len(policy.steps), "weight": self.weight(policy), "reason": self.reason, "message": self.message,
                "canaryRequests": canary.requests, "canaryErrors": canary.errors, "stableRequests": stable.requests, "stableErrors": stable.errors}

    @classmethod
    def from_status(cls, status: Any, stable: AdapterRef, canary: AdapterRef, now: float) -> Rollout | None:
        """The rollout an earlier operator was running for this canary (its step restarts), or None."""
        if not isinstance(status, dict) or status.get("canary") != canary.ring_key or status.get("phase") not in (*ACTIVE, *ENDED):
            return None
        step = status.get("step") if isinstance(status.get("step"), int) else 1
        return cls(stable, canary, status["phase"], max(0, step - 1), now, str(status.get("reason") or ""), str(status.get("message") or ""))


def judge(canary: VersionCounts, stable: VersionCounts, analysis: Analysis) -> tuple[str, str, str]:
    """("pass" | "wait" | "fail", reason, message) for one step's counts. Errors are judged against stable's so a
    fleet-wide failure is not blamed on the canary; latency only when both sides have ``minRequests`` first tokens."""
    floor = max(analysis.min_requests, 1)
    if canary.requests < floor:
        return "wait", "Analysing", f"{canary.requests}/{analysis.min_requests} canary requests so far"
    allowed = stable.error_ratio + analysis.max_error_ratio
    if canary.error_ratio > allowed:
        return "fail", "ErrorRatio", (f"canary error ratio {canary.error_ratio:.3f} ({canary.errors}/{canary.requests}) exceeds stable's "
                                      f"{stable.error_ratio:.3f} ({stable.errors}/{stable.requests}) + maxErrorRatio {analysis.max_error_ratio}")
    canary_p95, stable_p95 = canary.ttft_quantile(0.95), stable.ttft_quantile(0.95)
    if canary_p95 is not None and stable_p95 is not None and sum(canary.ttft) >= floor and sum(stable.ttft) >= floor:
        if canary_p95 > stable_p95 * analysis.max_ttft_p95_ratio + analysis.ttft_slack_s:
            return "fail", "TtftP95", (f"canary time-to-first-token p95 {canary_p95:.3f}s is {canary_p95 / stable_p95:.1f}x stable's "
                                       f"{stable_p95:.3f}s (maxTtftP95Ratio {analysis.max_ttft_p95_ratio}, ttftSlack {analysis.ttft_slack_s:g}s)")
    return "pass", "Analysing", f"canary {canary.errors}/{canary.requests} errors, stable {stable.errors}/{stable.requests}"


def advance(rollout: Rollout, policy: Policy, now: float, canary_hot: bool, action: str | None) -> bool:
    """Move ``rollout`` on by what happened (time, the latest window, an action); True when ``action`` was acted on
    (the annotation may go). A promote waits for the canary to be hot on every owner; an abort never waits."""
    if rollout.phase in ENDED:
        return action is not None
    if action == "abort":
        _end(rollout, "Aborted", "Aborted", f"aborted by the {ACTION_ANNOTATION} annotation; {rollout.stable.ring_key} serves")
        return True
    if action == "promote" and canary_hot:
        _end(rollout, "Promoted", "Promoted", f"promoted by the {ACTION_ANNOTATION} annotation")
        return True
    if rollout.phase == "Warming":
        if canary_hot:
            _start_step(rollout, 0, now)
        return False
    verdict, reason, message = judge(*(rollout.window or (VersionCounts(), VersionCounts())), policy.analysis)
    if verdict == "fail":
        _end(rollout, "RolledBack", reason, f"{message}; rolled back to {rollout.stable.ring_key}")
        return False
    if policy.paused:
        if rollout.phase != "Paused":
            rollout.phase, rollout.reason, rollout.message = "Paused", "Paused", f"paused at step {rollout.step + 1} (spec.rollout.paused)"
        return False
    if rollout.phase == "Paused":  # resumed: the step's pause runs again from now, over a fresh window
        _start_step(rollout, rollout.step, now)
        return False
    step = policy.steps[rollout.step]
    if now < rollout.step_started + step.pause_s or (verdict == "wait" and policy.analysis.min_requests > 0):
        rollout.reason, rollout.message = reason, f"step {rollout.step + 1}/{len(policy.steps)} at {step.weight:g}%: {message}"
        return False
    if rollout.step + 1 >= len(policy.steps):
        _end(rollout, "Promoted", "Promoted", f"every step passed; {rollout.canary.ring_key} serves")
    else:
        _start_step(rollout, rollout.step + 1, now)
    return False


def _start_step(rollout: Rollout, step: int, now: float) -> None:
    rollout.phase, rollout.step, rollout.step_started = "Progressing", step, now
    rollout.baseline, rollout.window = None, None  # the next read of the replicas' counters is the step's start
    rollout.reason, rollout.message = "Progressing", f"step {step + 1} started"


def _end(rollout: Rollout, phase: str, reason: str, message: str) -> None:
    rollout.phase, rollout.reason, rollout.message = phase, reason, message


def update_window(rollout: Rollout, counts: dict[str, dict[str, VersionCounts]]) -> None:
    """The step's (canary, stable) counts summed over the replicas, from the counters last read (``counts``: pod ->
    version -> counts). The first read after a step starts is its baseline; a replica that restarted counts from zero."""
    keys = (rollout.canary.ring_key, rollout.stable.ring_key)
    if rollout.baseline is None:
        rollout.baseline = {pod: {k: held[k] for k in keys if k in held} for pod, held in counts.items()}
    sums = []
    for key in keys:
        total = VersionCounts()
        for pod, held in counts.items():
            if key in held:
                total = total.plus(held[key].since(rollout.baseline.get(pod, {}).get(key)))
        sums.append(total)
    rollout.window = (sums[0], sums[1])
