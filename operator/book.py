"""What a fleet remembers of one Adapter between passes, in one place per Adapter (by uid), forgotten with it.

The fleet loop once kept this in eight dicts keyed by uid, each pruned, read and retried its own way; a reader had
to join them by hand to know where an Adapter stood.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lorafleet.adapter_ref import AdapterRef
from lorafleet.backoff import Backoff
from lorafleet.operator.rollout import Rollout


@dataclass(slots=True)
class Retry:
    """A failed attempt: not again before ``not_before`` (monotonic), after ``attempts`` failures; ``problem`` says why."""

    not_before: float
    attempts: int
    problem: str

    @classmethod
    def after(cls, previous: Retry | None, problem: str, backoff: Backoff) -> Retry:
        """The next attempt's wait after one more failure, backing off from ``previous``."""
        attempts = (previous.attempts if previous is not None else 0) + 1
        return cls(time.monotonic() + backoff.delay(attempts), attempts, problem)


@dataclass(slots=True)
class AdapterBook:
    checked: tuple[tuple, Any] | None = None  # (what was checked, ("ok", rank, targets) or ("failed", reason, message))
    check_retry: Retry | None = None  # the validation fetch failed for a reason that may pass
    refused: tuple[int, str, str] | None = None  # (generation, reason, message): a replica refused the adapter
    # (pod, adapter key) loaded and not unloaded: the key too, so that when an Adapter's revision changes the old
    # version is unloaded where it was, once the new one is hot on every owner
    placed: set[tuple[str, str]] | None = None
    written: dict[str, Any] | None = None  # the status last written
    unload_at: float | None = None  # when a moved adapter leaves its old holders
    finalized: bool = False  # our finalizer was added (until its watch event shows it)
    # The version the catalogue sends the Adapter's name to. It moves to the spec's version only once that one is hot on
    # every owner, so an update never sends traffic to a replica that must load it cold (nor a broken version anywhere).
    serving: AdapterRef | None = None
    rollout: Rollout | None = None  # the spec's version as a canary, when spec.rollout has steps (operator/rollout.py)
    work_since: float | None = None  # when its oldest running work started (its status waits for the work to settle)
    work_count: int = 0
    queued: int = 0  # loads waiting for a call slot on their replica (a scale-up queues thousands behind a few slots)
    load_retry: dict[tuple[str, str], Retry] = field(default_factory=dict)  # (pod, adapter key) -> a load that failed there

    def dues(self, settle_s: float, queued_patience_s: float) -> list[float]:
        """When this Adapter next needs a pass, if ever."""
        found = [self.check_retry.not_before] if self.check_retry is not None else []
        if self.unload_at is not None:
            found.append(self.unload_at)
        if self.work_since is not None:
            found.append(self.work_since + settle_s)
            if self.queued:
                found.append(self.work_since + queued_patience_s)
        found.extend(retry.not_before for retry in self.load_retry.values())
        return found
