"""A pod's Ready condition as the kubelet keeps it from the container's ``readinessProbe``.

A kubelet marks a Ready pod not ready only after ``failureThreshold`` probes in a row failed, each
``periodSeconds`` apart, each allowed ``timeoutSeconds``: one slow ``/health`` on a busy node does not take a
serving replica out of its Service. The node agent once flipped a pod on a single probe (1 s timeout, every
half second): a replica that stalled for a second (loading an adapter on a busy 2-core machine) left the
EndpointSlice, and the gateway sent its adapters' next requests to a replica that had to load them cold (the
likely cause of a rare cold answer in the rollout test under the whole suite in CI).

One deliberate difference: a pod not yet Ready is probed on every round of the agent rather than once a period,
so ``lorafleet up`` and a scale from zero are not held back by up to a period after the process answers. A
process that exited is not ready at once, as a kubelet sees a container exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The kubelet's defaults for a probe that leaves them out.
DEFAULT_PERIOD_S, DEFAULT_TIMEOUT_S, DEFAULT_FAILURE_THRESHOLD = 10.0, 1.0, 3


@dataclass
class Readiness:
    period_s: float = DEFAULT_PERIOD_S
    timeout_s: float = DEFAULT_TIMEOUT_S
    failure_threshold: int = DEFAULT_FAILURE_THRESHOLD
    ready: bool = False
    failures: int = 0  # probes failed in a row since the last success
    last_probe: float | None = None

    @classmethod
    def from_container(cls, container: dict[str, Any]) -> Readiness:
        probe = container.get("readinessProbe") or {}
        return cls(period_s=float(probe.get("periodSeconds") or DEFAULT_PERIOD_S),
                   timeout_s=float(probe.get("timeoutSeconds") or DEFAULT_TIMEOUT_S),
                   failure_threshold=max(1, int(probe.get("failureThreshold") or DEFAULT_FAILURE_THRESHOLD)))

    def due(self, now: float) -> bool:
        """Whether to probe now: every round while not ready, once a period while ready."""
        return not self.ready or self.last_probe is None or now - self.last_probe >= self.period_s

    def record(self, succeeded: bool, now: float) -> bool:
        """Count one probe's answer; returns whether the pod is ready now."""
        self.last_probe = now
        if succeeded:
            self.ready, self.failures = True, 0
        else:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self.ready = False
        return self.ready

    def exited(self) -> None:
        """The container stopped (or is being restarted): not ready until a probe of the new process succeeds."""
        self.ready, self.failures, self.last_probe = False, 0, None
