"""Which replica holds which adapter hot, as far as this gateway can tell.

The ring's cache-aware pick (lorafleet.ring.pick) needs, per request, the replicas that hold
the adapter on their device. Two sources keep that view close to the truth:

- every request the gateway routes marks its adapter as most recently used on that replica,
  in an LRU as large as the replica's device slots (its ``max_active_adapters``) — the same
  eviction the replica does, so between syncs the view follows the traffic for free;
- each health probe replaces a replica's set with what it reports (``GET /adapters?tier=...``),
  which corrects for adapters pre-warmed by the operator, traffic through other gateways,
  failed loads and restarts.

A wrong guess costs one miss (the pick still respects the load bound), never a wrong answer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from lorafleet.adapter_ref import AdapterRef

DEFAULT_SLOTS = 64  # until a replica's /info says how many device slots it has


class HotAdapters:
    def __init__(self) -> None:
        self._lru: dict[str, OrderedDict[str, None]] = {}
        self._slots: dict[str, int] = {}
        self._holders: dict[str, set[str]] = {}
        self._refs: dict[str, AdapterRef] = {}  # ring key -> the adapter it names, from the replicas' listings
        self._warm: dict[str, set[str]] = {}  # key -> replicas holding it in CPU memory, from the listings

    def holders(self, key: str) -> set[str]:
        """The replicas believed to hold ``key`` hot (read-only; do not mutate)."""
        return self._holders.get(key, set())

    def warm_holders(self, key: str) -> set[str]:
        """The replicas that reported ``key`` in their CPU tier (read-only)."""
        return self._warm.get(key, set())

    def replace_warm(self, replica: str, keys: Iterable[str]) -> None:
        for holders in self._warm.values():
            holders.discard(replica)
        for key in keys:
            self._warm.setdefault(key, set()).add(replica)
        for key in [k for k, holders in self._warm.items() if not holders]:
            del self._warm[key]

    def keys(self) -> list[str]:
        return list(self._holders)

    def keys_of(self, replica: str) -> list[str]:
        return list(self._lru.get(replica, ()))

    def ref(self, key: str) -> AdapterRef | None:
        """What a replica's listing said ``key`` is (source and revision): what a hand-off must ask for."""
        return self._refs.get(key)

    def note_ref(self, ref: AdapterRef) -> None:
        self._refs[ref.ring_key] = ref

    def count(self, replica: str) -> int:
        return len(self._lru.get(replica, ()))

    def set_slots(self, replica: str, slots: int) -> None:
        self._slots[replica] = max(1, slots)
        self._trim(replica)

    def used(self, replica: str, key: str) -> None:
        """A request for ``key`` was sent to ``replica``: it loads the adapter if it did not hold it."""
        lru = self._lru.setdefault(replica, OrderedDict())
        if key in lru:
            lru.move_to_end(key)
        else:
            lru[key] = None
            self._holders.setdefault(key, set()).add(replica)
            self._trim(replica)

    def replace(self, replica: str, keys: Iterable[str]) -> None:
        """What the replica reported holding, least recently used first."""
        self._drop(replica)
        for key in keys:
            self.used(replica, key)

    def retain(self, replicas: Iterable[str]) -> None:
        """Forget replicas that left the fleet."""
        members = set(replicas)
        for holders in self._warm.values():
            holders &= members
        for gone in set(self._lru) - members:
            self._drop(gone)
            self._slots.pop(gone, None)

    def _trim(self, replica: str) -> None:
        lru = self._lru.get(replica)
        while lru and len(lru) > self._slots.get(replica, DEFAULT_SLOTS):
            self._forget(replica, lru.popitem(last=False)[0])

    def _drop(self, replica: str) -> None:
        for key in self._lru.pop(replica, ()):
            self._forget(replica, key)

    def _forget(self, replica: str, key: str) -> None:
        holders = self._holders.get(key)
        if holders is not None:
            holders.discard(replica)
            if not holders:
                del self._holders[key]
                self._refs.pop(key, None)
