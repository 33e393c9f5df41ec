"""The gateway's view of the replicas: who is there, how loaded, and who is ejected for failing.

Membership comes from discovery (a static list, or a Service's ready EndpointSlices); health
comes from both passive signals (a replica that fails ``eject_after`` requests in a row is left
out for a while, doubling on repeats) and active ``/health`` probes that bring it back. The same
probes read which adapters each replica holds hot (see hot_adapters.py).
Everything here runs on the gateway's one event loop; discovery threads hand updates over
through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from lorafleet.adapter_ref import AdapterRef
from lorafleet.backoff import Backoff
from lorafleet.gateway.catalogue import Catalogue
from lorafleet.gateway.hot_adapters import HotAdapters

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Replica:
    name: str  # the identity the ring hashes (pod name), stable across IP changes
    url: str
    in_flight: int = 0
    consecutive_failures: int = 0
    ejections: int = 0
    ejected_until: float = 0.0
    model_id: str | None = None
    info_read: bool = False
    probed_healthy: bool | None = None  # the last health probe's answer (None before the first)
    # Set when the replica is ejected: requests waiting on it with nothing answered yet move on
    # (a stopped process keeps its connections open and would hold them until the upstream timeout).
    ejected_signal: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def host(self) -> bytes:
        """The Host header for requests to it (its URL's host:port)."""
        return self.url.split("://", 1)[-1].split("/", 1)[0].encode()

    @property
    def ejected(self) -> bool:
        return time.monotonic() < self.ejected_until


@dataclass
class ReplicaSet:
    eject_after: int = 3
    eject_seconds: float = 5.0
    replicas: dict[str, Replica] = field(default_factory=dict)
    on_eject: Callable[[], None] = lambda: None
    hot: HotAdapters = field(default_factory=HotAdapters)
    catalogue: Catalogue = field(default_factory=Catalogue)
    handoff: Any = None  # gateway.handoff.HandOff, when hand-offs are on

    def _joined(self, name: str) -> None:
        if self.handoff is not None:
            self.handoff.joined(name)

    def _leaving(self, name: str) -> None:
        if self.handoff is not None:
            self.handoff.leaving(name, self.hot.keys_of(name))

    def update(self, members: dict[str, str]) -> None:
        """Replace membership with ``{name: url}``; known replicas keep their counters."""
        gone = [name for name in self.replicas if name not in members]
        for name in gone:
            del self.replicas[name]
        joined = []
        for name, url in members.items():
            if name in self.replicas:
                self.replicas[name].url = url
            else:
                self.replicas[name] = Replica(name, url)
                joined.append(name)
        for name in gone:  # before the hot map forgets what they held
            self._leaving(name)
        self.hot.retain(members)
        for name in joined:
            self._joined(name)
        log.info("replicas: %s", ", ".join(f"{n}={u}" for n, u in sorted(members.items())) or "none")

    def routable(self) -> dict[str, Replica]:
        live = {n: r for n, r in self.replicas.items() if not r.ejected}
        return live or dict(self.replicas)  # all ejected: still try them rather than fail outright

    def states(self) -> dict[str, int]:
        """How many replicas are routable, ejected, or failing their health probe (for /metrics)."""
        replicas = list(self.replicas.values())
        ejected = sum(r.ejected for r in replicas)
        unhealthy = sum(r.probed_healthy is False and not r.ejected for r in replicas)
        return {"routable": len(replicas) - ejected - unhealthy, "ejected": ejected, "unhealthy": unhealthy}

    def base_model_ids(self) -> set[str]:
        return {r.model_id for r in self.replicas.values() if r.model_id} | ({self.catalogue.base} if self.catalogue.base else set())

    def succeeded(self, replica: Replica) -> None:
        replica.consecutive_failures = 0

    def failed(self, replica: Replica) -> None:
        replica.consecutive_failures += 1
        if replica.consecutive_failures >= self.eject_after and not replica.ejected:
            replica.ejections += 1
            self.on_eject()
            seconds = Backoff(self.eject_seconds, 60.0).delay(replica.ejections)
            replica.ejected_until = time.monotonic() + seconds
            replica.ejected_signal.set()
            replica.ejected_signal = asyncio.Event()  # the next ejection signals whoever waits from now on
            log.warning("ejected %s for %.0fs after %d failures in a row", replica.name, seconds, replica.consecutive_failures)

    async def probe_forever(self, client: httpx.AsyncClient, interval: float) -> None:
        """Active health: every ``interval`` seconds, /health each replica and read its hot adapters; /info once; the catalogue if it changed."""
        while True:
            await asyncio.gather(*(self._probe(client, r) for r in list(self.replicas.values())), return_exceptions=True)
            healthy = [r for r in self.replicas.values() if not r.ejected]
            if healthy:
                await self.catalogue.refresh(client, healthy[0].url)
            await asyncio.sleep(interval)

    async def _probe(self, client: httpx.AsyncClient, replica: Replica) -> None:
        try:
            healthy = (await client.get(replica.url + "/health", timeout=2.0)).status_code == 200
            if healthy and not replica.info_read:
                info = (await client.get(replica.url + "/info", timeout=2.0)).json()
                if not isinstance(info, dict):
                    raise ValueError(f"/info answered {type(info).__name__}, not an object")
                replica.model_id = info.get("model_id")
                if isinstance(info.get("max_active_adapters"), int):
                    self.hot.set_slots(replica.name, info["max_active_adapters"])
                replica.info_read = True
        except (httpx.HTTPError, ValueError):  # a bug here (AttributeError, ...) is not a replica being unhealthy: it raises
            healthy = False
        # Transitions of the probe's own answer, not of the ejection (which expires on a timer: a replica
        # answering for the first time just after its ejection ran out would otherwise never count as back).
        back, went = healthy and replica.probed_healthy is False, not healthy and replica.probed_healthy is not False
        replica.probed_healthy = healthy
        if healthy and replica.ejected:
            log.info("%s is healthy again", replica.name)
            replica.ejected_until = 0.0
            replica.consecutive_failures = 0
        elif not healthy and not replica.ejected:
            replica.consecutive_failures = max(replica.consecutive_failures, self.eject_after - 1)
            self.failed(replica)
        if went:
            self._leaving(replica.name)  # draining or gone: what only it held goes to the next owners
        if healthy:
            await self._read_hot_adapters(client, replica)
        if back:
            self._joined(replica.name)

    async def _read_hot_adapters(self, client: httpx.AsyncClient, replica: Replica) -> None:
        """Replace the gateway's guess of the replica's device slots with what it reports.

        A replica without lorafleet's admin routes, or an answer that does not parse, leaves the
        guess from the traffic in place; it says nothing about the replica's health.
        """
        try:
            response = await client.get(replica.url + "/adapters", params=[("tier", "device"), ("tier", "loading"), ("tier", "cpu")], timeout=2.0)
            if response.status_code != 200:
                return
            rows = response.json()
            if not isinstance(rows, list) or not all(isinstance(a, dict) for a in rows):
                return
            everything = sorted(rows, key=lambda a: -float(a.get("last_used_s_ago") or 0.0))
            listing = [a for a in everything if a.get("tier") != "cpu"]
            refs = [AdapterRef.from_entry(a) for a in listing]
            warm = [AdapterRef.from_entry(a).ring_key for a in everything if a.get("tier") == "cpu"]
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            return
        self.hot.replace(replica.name, [ref.ring_key for ref in refs])
        self.hot.replace_warm(replica.name, warm)
        for ref in refs:
            self.hot.note_ref(ref)
