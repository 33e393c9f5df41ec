"""A fleet's canary rollouts: which Adapter is rolling, the replicas' counters they are judged on, and the splits the
catalogue carries. The fleet (fleet.py) does the I/O; this keeps the state and applies operator/rollout.py to it.

The counters of the versions under analysis are read from every member replica every ``analysis.interval`` (the
shortest of the rollouts under way), a GET per replica whatever the number of rollouts; at rest nothing is read.
"""

from __future__ import annotations

import logging
from typing import Any

from lorafleet.operator.adapter_status import AdapterRecord
from lorafleet.operator.book import AdapterBook
from lorafleet.operator.rollout import ACTIONS, Policy, Rollout, advance, update_window
from lorafleet.traffic_split import Split, VersionCounts

log = logging.getLogger(__name__)
TAKING_TRAFFIC = ("Progressing", "Paused")


class Canaries:
    def __init__(self) -> None:
        self.counts: dict[str, dict[str, VersionCounts]] = {}  # pod -> version (ring key) -> its counters, last read
        self.read_due = 0.0  # monotonic: when the counters are next read (while a canary takes traffic)
        self._splits: dict[str, Split] = {}  # Adapter uid -> the split its name's catalogue entry carries
        self._interval: dict[str, float] = {}  # Adapter uid -> its analysis interval, while its canary takes traffic
        self._step_ends: dict[str, float] = {}  # Adapter uid -> when its current step's pause ends

    @staticmethod
    def policy(record: AdapterRecord) -> Policy:
        try:
            return Policy.from_spec(record.rollout)
        except (ValueError, KeyError, TypeError) as exc:  # the CRD's schema refuses these; an older object may still hold one
            log.warning("Adapter %s/%s: spec.rollout ignored: %s", record.namespace, record.name, exc)
            return Policy()

    def current(self, record: AdapterRecord, book: AdapterBook, now: float) -> Rollout | None:
        """The rollout of the spec's version, when the Adapter has a canary policy and its name still serves another
        version (or its canary was just promoted: kept for the status until the spec changes)."""
        rollout = book.rollout
        if book.serving == record.ref:
            if rollout is not None and (rollout.canary != record.ref or rollout.phase != "Promoted"):
                book.rollout = rollout = None
            return rollout
        policy = self.policy(record)
        if not policy.steps:
            book.rollout = None
            return None
        if rollout is None or rollout.canary != record.ref or rollout.stable != book.serving:
            rollout = Rollout.from_status(record.status.get("rollout"), book.serving, record.ref, now) or Rollout(book.serving, record.ref)
            book.rollout = rollout
        return rollout

    def step(self, record: AdapterRecord, rollout: Rollout, canary_hot: bool, now: float) -> bool:
        """Move the rollout on; True when the Adapter's rollout-action annotation was acted on (or is unknown) and may go."""
        policy = self.policy(record)
        if rollout.phase in TAKING_TRAFFIC:
            update_window(rollout, self.counts)
        action = record.action
        acted = action is not None and action not in ACTIONS
        if acted:
            log.warning("Adapter %s/%s: unknown rollout action %r (promote or abort)", record.namespace, record.name, action)
        acted = advance(rollout, policy, now, canary_hot, action if action in ACTIONS else None) or acted
        uid = record.uid
        split = rollout.split(policy) if policy.steps else None
        if split is not None:
            self._splits[uid], self._interval[uid] = split, policy.analysis.interval_s
            self._step_ends[uid] = rollout.step_started + policy.steps[min(rollout.step, len(policy.steps) - 1)].pause_s
        else:
            self.forget(uid)
        return acted

    def status(self, record: AdapterRecord, rollout: Rollout | None) -> dict[str, Any] | None:
        return rollout.status(self.policy(record)) if rollout is not None else None

    def forget(self, uid: str) -> None:
        for held in (self._splits, self._interval, self._step_ends):
            held.pop(uid, None)

    def uids(self) -> set[str]:
        """The Adapters whose canary takes traffic: a pass looks at them every time (their steps move with time)."""
        return set(self._splits)

    def catalogue_canaries(self, records: list[AdapterRecord]) -> dict[str, dict[str, Any]]:
        """name -> the ``canary`` field of its catalogue entry, for the Adapters whose canary takes traffic."""
        if not self._splits:
            return {}
        return {r.name: self._splits[r.uid].entry() for r in records if r.uid in self._splits}

    def versions(self, books: dict[str, AdapterBook]) -> list[str]:
        """The versions whose counters the analysis needs now (stable and canary of each rollout taking traffic)."""
        keys = set()
        for uid in self._splits:
            rollout = books[uid].rollout if uid in books else None
            if rollout is not None:
                keys |= {rollout.stable.ring_key, rollout.canary.ring_key}
        return sorted(keys)

    def reading_due(self, now: float) -> bool:
        """Whether to read the counters now (and when next): only while some canary takes traffic."""
        if not self._interval or now < self.read_due:
            return False
        self.read_due = now + min(self._interval.values())
        return True

    def dues(self) -> list[float]:
        return [self.read_due, *self._step_ends.values()] if self._interval else []

    def keep_pods(self, members: dict[str, str]) -> None:
        for pod in [p for p in self.counts if p not in members]:
            del self.counts[pod]
