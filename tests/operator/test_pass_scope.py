"""A fleet's pass looks at the Adapters something happened to, not at all of them (operator/pass_scope.py).

The fleet runs in process against stand-in replicas and API writes, so what is counted is the fleet's own work: how
many Adapters a pass placed. At rest it must be none; after one Adapter's event, that one; after a replica joins,
every one — and the placement that results must be the same as a pass over everything would make.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from lorafleet import ring
from lorafleet.operator.adapter_status import FINALIZER, AdapterRecord
from lorafleet.operator.fleet import Fleet
from lorafleet.operator.fleet_io import FleetIO, PodView
from lorafleet.operator.replica_client import LoadResult

ADAPTERS = 2000


class Replicas:
    """What each stand-in replica holds; a load of a key in ``failing`` fails (as a busy replica's would) until cleared."""

    def __init__(self) -> None:
        self.held: dict[str, dict[str, str]] = {}
        self.failing: set[str] = set()
        self.catalogues: dict[str, list[dict]] = {}

    async def resident(self, url: str) -> dict[str, str]:
        return dict(self.held.setdefault(url, {}))

    async def load(self, url: str, body: dict, headers: dict, started=None) -> LoadResult:
        if started is not None:
            started()
        key = f"local:{body['adapter_id']}"
        if key in self.failing:
            return LoadResult(False, message="busy")
        self.held.setdefault(url, {})[key] = "d"
        return LoadResult(True, "cpu", "d")

    async def unload(self, url: str, key: str, headers: dict) -> bool:
        self.held.setdefault(url, {}).pop(key, None)
        return True

    async def put_catalogue(self, url: str, entries: list[dict], headers: dict) -> bool:
        self.catalogues[url] = entries
        return True


class Writes:
    def __init__(self) -> None:
        self.statuses: dict[str, dict] = {}

    def merge(self, *args) -> None:
        pass

    def merge_status(self, api_version: str, kind: str, namespace: str, name: str, status: dict) -> None:
        self.statuses[name] = status


def record(i: int) -> AdapterRecord:
    return AdapterRecord.from_body({"metadata": {"name": f"a{i}", "uid": f"uid{i}", "finalizers": [FINALIZER]},
                                    "spec": {"baseModel": "b", "id": f"org/a{i}", "source": "local"}})


def pod(i: int) -> PodView:
    return PodView(f"p{i}", f"http://127.0.0.{10 + i}:8000", f"u{i}", 0)


class Counting(Fleet):
    """The fleet, counting the Adapters each pass places."""

    placed_now = 0

    def _place(self, record, members, known, engine, now) -> None:
        self.placed_now += 1
        super()._place(record, members, known, engine, now)


async def settle(fleet: Counting, records: list[AdapterRecord], pods: list[PodView]) -> list[int]:
    """Passes until no work runs and nothing is due soon; the Adapters each pass placed."""
    counts = []
    for _ in range(200):
        fleet.placed_now = 0
        await fleet.reconcile(records, pods, {})
        counts.append(fleet.placed_now)
        while fleet._tasks:
            await asyncio.sleep(0.01)
        if counts[-1] == 0 and fleet._next_due() - asyncio.get_running_loop().time() > 1.0 and not fleet._tasks:
            return counts
        await asyncio.sleep(0.05)
    raise AssertionError(f"the fleet never came to rest: {counts[-10:]}")


async def test_a_pass_looks_only_at_what_changed_and_places_as_a_full_pass_would(monkeypatch) -> None:
    monkeypatch.setattr("lorafleet.operator.fleet.SETTLE_S", 0.05)
    monkeypatch.setattr("lorafleet.operator.fleet.UNLOAD_GRACE_S", 0.05)
    replicas, writes = Replicas(), Writes()
    fleet = Counting("default", "b", FleetIO(writes, ThreadPoolExecutor(4), replicas, lambda *a: None, dict), residency_check_s=3600.0)
    records, pods = [record(i) for i in range(ADAPTERS)], [pod(0), pod(1)]
    counts = await settle(fleet, records, pods)
    # each Adapter is looked at once per thing that happened to it: first sight, its owner's listing, its load, its status
    assert counts[0] == ADAPTERS and sum(counts) <= 4 * ADAPTERS, counts
    assert all(writes.statuses[f"a{i}"]["phase"] == "Ready" for i in range(ADAPTERS))

    fleet.placed_now = 0
    await fleet.reconcile(records, pods, {})
    assert fleet.placed_now == 0  # at rest: nothing to look at

    records[7] = AdapterRecord.from_body({"metadata": {"name": "a7", "uid": "uid7", "finalizers": [FINALIZER]},
                                          "spec": {"baseModel": "b", "id": "org/a7-v2", "source": "local"}})  # its watch event
    counts = await settle(fleet, records, pods)
    assert counts[0] == 1 and max(counts) == 1, counts
    owner = ring.owners("local:org/a7-v2", [p.name for p in pods], 1)[0]
    assert "local:org/a7-v2" in replicas.held[pod(int(owner[1:])).url]
    assert writes.statuses["a7"]["replicas"] == [owner]

    replicas.failing.add("local:org/a9-v2")  # a load that fails is tried again when its backoff ends, by itself
    records[9] = AdapterRecord.from_body({"metadata": {"name": "a9", "uid": "uid9", "finalizers": [FINALIZER]},
                                          "spec": {"baseModel": "b", "id": "org/a9-v2", "source": "local"}})
    fleet.placed_now = 0
    await fleet.reconcile(records, pods, {})
    while fleet._tasks:
        await asyncio.sleep(0.01)
    replicas.failing.clear()
    counts = await settle(fleet, records, pods)
    assert max(counts) == 1, counts
    assert any("local:org/a9-v2" in held for held in replicas.held.values())

    pods.append(pod(2))  # a replica joins: every Adapter is looked at, and about a third move to it
    counts = await settle(fleet, records, pods)
    assert counts[0] == ADAPTERS, counts
    members = [p.name for p in pods]
    for i in range(ADAPTERS):
        ref = records[i].ref
        owner = ring.owners(ref.ring_key, members, 1)[0]
        assert [url for url, held in replicas.held.items() if ref.key in held] == [pod(int(owner[1:])).url], records[i].name
        assert writes.statuses[records[i].name]["replicas"] == [owner]
    moved = sum(1 for i in range(ADAPTERS) if ring.owners(records[i].ref.ring_key, members, 1) == ["p2"])
    assert 0.25 * ADAPTERS < moved < 0.42 * ADAPTERS
    assert {e["name"] for e in replicas.catalogues[pod(2).url]} == {r.name for r in records}
