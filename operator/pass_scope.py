"""Which Adapters a fleet's pass must look at: the ones something happened to, not all of them.

A pass over every Adapter costs O(adapters) (a ring ranking, a status comparison each): 0.3 s at 10,000. Passes run
after every burst of events, so while a thousand loads and status writes complete, a fleet that looked at everything
each time did O(adapters) work per completion — quadratic in the size of the fleet (10,000 Adapters took 230 s to be
Ready, 116 s to re-place after a scale). An Adapter needs a look only when its own object changed (a new watch event:
kopf's index hands a new record), when work about it finished, when a time it waits for comes (a retry, the end of a
grace or settle period), or when the world every placement depends on changed (the ready replicas, a replica's
listing read again, the engine's limits, demand-driven owner counts): then every Adapter is looked at, once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from lorafleet.operator.adapter_status import AdapterRecord


class PassScope:
    def __init__(self) -> None:
        self._seen: dict[str, AdapterRecord] = {}  # uid -> the record a pass last looked at
        self._dirty: set[str] = set()  # uids whose work finished since the last pass
        self._due: dict[str, float] = {}  # uid -> the next time it waits for (monotonic), when it waits for one
        self._everything = True
        self._world: object = None
        self.arrived = 0  # Adapters the last selection had never seen (with a count unchanged, one may have gone)

    def touch(self, uid: str) -> None:
        """Work about ``uid`` finished: its next pass looks at it."""
        self._dirty.add(uid)

    def everything(self) -> None:
        """Something every placement depends on changed: the next pass looks at every Adapter."""
        self._everything = True

    def world(self, world: object) -> None:
        """What every placement depends on, as one comparable value; a change looks at everything."""
        if world != self._world:
            self._world = world
            self._everything = True

    def select(self, records: Iterable[AdapterRecord], now: float, always: set[str]) -> list[AdapterRecord]:
        """The records this pass must look at; ``always``: uids looked at every pass (rollouts under way)."""
        every, self._everything = self._everything, False
        dirty, self._dirty = self._dirty, set()
        seen, due, chosen, arrived = self._seen, self._due, [], 0
        for record in records:
            uid = record.uid
            if every or uid in dirty or seen.get(uid) is not record or due.get(uid, math.inf) <= now or uid in always:
                arrived += uid not in seen
                seen[uid] = record
                chosen.append(record)
        self.arrived = arrived
        return chosen

    def looked_at(self, uid: str, dues: Iterable[float], now: float) -> None:
        """The pass looked at ``uid``; ``dues``: the times it waits for. Those already past were acted on in this pass
        (a retry started, a grace ended): what follows from them arrives as finished work."""
        upcoming = min((d for d in dues if d > now), default=None)
        if upcoming is None:
            self._due.pop(uid, None)
        else:
            self._due[uid] = upcoming

    def forget(self, uid: str) -> None:
        self._seen.pop(uid, None)
        self._due.pop(uid, None)
        self._dirty.discard(uid)

    def next_due(self) -> float:
        return min(self._due.values(), default=math.inf)
