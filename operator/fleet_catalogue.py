"""A fleet's catalogue (every Adapter's name -> the version it serves) and which replica holds which copy of it.

Every replica learns the catalogue so that a name alone is a request. It is made again only when an Adapter's name,
its serving version, a canary split or an owner count changed, and, while thousands of Adapters arrive, at a pace that
keeps it a small part of the fleet's work (making it is O(adapters); at 10,000 names ~50 ms, and each copy a replica
receives is a 1 MB PUT). The fleet (fleet.py) does the PUTs.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from lorafleet.adapter_ref import AdapterRef, catalogue_entries, catalogue_version

PACE = 20.0  # made again at most once per this many times what making it took (10,000 names: about once a second)


class FleetCatalogue:
    def __init__(self) -> None:
        self._named: dict[str, tuple[str, AdapterRef]] = {}  # Adapter uid -> (name, the version its name serves)
        self._changes = 0
        self._made: tuple[tuple, list[dict[str, Any]], str] | None = None  # (what it was made from, entries, version)
        self._next = 0.0  # monotonic: not made again before this
        self.deferred = False  # it changed and waits for its pace
        self.sent: dict[str, tuple] = {}  # pod -> (its identity, the catalogue version it holds)
        self.retry: dict[str, float] = {}  # pod -> not before (monotonic), after a PUT failed

    def name(self, uid: str, named: tuple[str, AdapterRef] | None) -> None:
        """What the catalogue says of one Adapter (None: nothing, it is going)."""
        if self._named.get(uid) != named:
            self._changes += 1
            if named is None:
                del self._named[uid]
            else:
                self._named[uid] = named

    def keep(self, present: set[str]) -> None:
        """Only the Adapters that still exist."""
        for uid in [u for u in self._named if u not in present]:
            self.name(uid, None)

    def current(self, canaries: dict[str, dict[str, Any]], owners: Mapping[str, int], now: float) -> tuple[list[dict[str, Any]], str]:
        """(entries, version) to share now: made again when it changed and its pace allows."""
        made_from = (self._changes, canaries, dict(owners))
        if self._made is None or (self._made[0] != made_from and now >= self._next):
            started = time.monotonic()
            entries = catalogue_entries(dict(self._named.values()), canaries, owners)
            self._made = (made_from, entries, catalogue_version(entries))
            self._next = now + PACE * (time.monotonic() - started)
        self.deferred = self._made[0] != made_from
        return self._made[1], self._made[2]

    def delivered(self, members: Mapping[str, str]) -> bool:
        """Every member holds a catalogue made from every name change so far (none deferred, none still being sent)."""
        return (self._made is not None and not self.deferred and self._made[0][0] == self._changes
                and all(self.sent.get(pod, (None, ""))[1] == self._made[2] for pod in members))

    def dues(self) -> list[float]:
        return [*self.retry.values(), *([self._next] if self.deferred else [])]

    def to_send(self, members: Mapping[str, str], identities: Mapping[str, Any], version: str, now: float) -> list[tuple[str, str, tuple]]:
        """(pod, url, what it will hold) for each member that lacks this version and may be sent it now."""
        return [(pod, url, (identities.get(pod), version)) for pod, url in members.items()
                if self.sent.get(pod) != (identities.get(pod), version) and self.retry.get(pod, 0.0) <= now]
