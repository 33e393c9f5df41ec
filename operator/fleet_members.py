"""A fleet's ready replica pods and what each holds, as far as its own listing (and our loads since) say.

A replica that joins, restarts (new uid or restart count) or returns to Ready has its listing read again at once;
every replica's listing is re-read every ``check_s`` (one GET per replica, whatever the number of adapters) to catch
what events cannot show (an adapter a busy replica evicted). The fleet (fleet.py) makes the GETs.
"""

from __future__ import annotations

from lorafleet.backoff import Backoff
from lorafleet.operator.fleet_io import PodView

RELIST = Backoff(2.0, 2.0)  # a listing or catalogue call: flat, the replica is usually just starting


class FleetMembers:
    def __init__(self, check_s: float) -> None:
        self.check_s = check_s
        self.seen: dict[str, tuple[str, int, str]] = {}  # pod -> (uid, restarts, url) of the ready ones
        self.held: dict[str, dict[str, str | None]] = {}  # pod -> {adapter key: the content digest it serves}, once read
        self.list_retry: dict[str, float] = {}  # pod -> not before (monotonic), after a listing failed
        self.next_check = 0.0

    def follow(self, pods: list[PodView], now: float) -> tuple[dict[str, str], list[tuple[str, str]]]:
        """(ready members: pod -> url, the (pod, url) whose listing to read now)."""
        members = {p.name: p.url for p in pods if p.url}
        seen = {p.name: (p.uid, p.restarts, p.url) for p in pods if p.url}
        for name, identity in seen.items():
            if self.seen.get(name) != identity:
                self.held.pop(name, None)
                self.list_retry.pop(name, None)
        self.seen = seen
        for name in [n for n in self.held if n not in members]:
            del self.held[name]
        due = now >= self.next_check
        if due:
            self.next_check = now + self.check_s
        return members, [(name, url) for name, url in members.items() if (name not in self.held or due) and self.list_retry.get(name, 0.0) <= now]

    def listed(self, pod: str, url: str, listing: dict[str, str | None]) -> bool:
        """A listing arrived; False when the pod has moved on since it was asked (a restart, another address)."""
        if self.seen.get(pod, ("", 0, None))[2] != url:
            return False
        self.held[pod] = listing
        return True

    def listing_failed(self, pod: str, now: float) -> None:
        self.list_retry[pod] = now + RELIST.delay(1)

    def dues(self) -> list[float]:
        return [self.next_check, *self.list_retry.values()]
