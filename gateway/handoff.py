"""Scale events without cold storms: adapters are warmed where their traffic is about to go.

When a replica joins (or comes back healthy), the adapters hot elsewhere that the ring now gives
to it are warmed on it (``POST /adapters/warm``) while the replicas holding them keep the traffic:
the routing prefers a replica holding an adapter hot, so the traffic moves only once the new owner
holds it too. When a replica leaves or turns unhealthy (a drain on SIGTERM answers /health 503),
the adapters only it held are warmed on their next owners. It works from what the gateway reads of
every replica's device tier, so adapters loaded on demand are handed off as well as Adapter
resources. ``--no-handoff`` switches it off, to measure what it buys.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import httpx
from prometheus_client import Counter

from lorafleet import ring
from lorafleet.adapter_ref import AdapterRef
from lorafleet.bearer import authorization

log = logging.getLogger(__name__)
WARM_TIMEOUT_S = 120.0


class HandOff:
    def __init__(self, replicas: object, client: httpx.AsyncClient, counter: Counter, per_replica: int = 4, warm_token: str | None = None) -> None:
        self.replicas = replicas  # gateway.replicas.ReplicaSet
        self.client, self.counter, self.per_replica = client, counter, per_replica
        self._headers = authorization(warm_token)
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._running: set[tuple[str, str]] = set()
        self._tasks: set[asyncio.Task] = set()

    def joined(self, name: str) -> None:
        """``name`` is routable now: warm on it what it owns and only others hold hot."""
        members = sorted(self.replicas.routable())
        hot = self.replicas.hot
        for key in list(hot.keys()):
            holders = hot.holders(key)
            if holders and name not in holders and ring.owners(key, members, 1) == [name]:
                self._start(name, key)

    def leaving(self, name: str, keys: Iterable[str]) -> None:
        """``name`` is going: warm what only it held on each adapter's next owner."""
        members = sorted(m for m in self.replicas.routable() if m != name)
        if not members:
            return
        hot = self.replicas.hot
        for key in keys:
            if not (set(hot.holders(key)) - {name}):
                self._start(ring.owners(key, members, 1)[0], key)

    def _start(self, target: str, key: str) -> None:
        ref = self.replicas.hot.ref(key)
        if ref is None or (target, key) in self._running:
            return  # seen only in traffic so far (no listing said where it comes from): the next request loads it
        self._running.add((target, key))
        task = asyncio.get_running_loop().create_task(self._warm(target, key, ref))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _warm(self, target: str, key: str, ref: AdapterRef) -> None:
        try:
            replica = self.replicas.replicas.get(target)
            if replica is None:
                return
            async with self._limits.setdefault(target, asyncio.Semaphore(self.per_replica)):
                response = await self.client.post(replica.url + "/adapters/warm", json=ref.load_body(),
                                                  headers=self._headers, timeout=WARM_TIMEOUT_S)
            if response.status_code == 200:
                self.replicas.hot.used(target, key)  # routable to it from now on
                self.counter.labels("warmed").inc()
            else:
                self.counter.labels("refused").inc()
                log.info("hand-off of %s to %s: HTTP %d", key, target, response.status_code)
        except httpx.HTTPError as exc:
            self.counter.labels("failed").inc()
            log.info("hand-off of %s to %s failed: %s", key, target, exc)
        finally:
            self._running.discard((target, key))

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()
