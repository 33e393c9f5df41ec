"""A hot adapter's requests spread over the owners the operator warmed it on (the catalogue's ``owners``)."""

from __future__ import annotations

import contextlib
import threading

import httpx
import pytest
from support.upstream import CatalogueUpstream, Gateway
from support.waiting import wait_until

from lorafleet import ring

pytestmark = pytest.mark.e2e


def concurrent_servers(spread: int | None) -> tuple[list[str], list[str]]:
    """(who served three concurrent requests for ``hot``, its ring owners)."""
    entry = {"name": "hot", "id": "hot-v1", "source": "local", "revision": None, **({"owners": spread} if spread else {})}
    with contextlib.ExitStack() as stack:
        upstreams = [stack.enter_context(CatalogueUpstream([entry])) for _ in range(3)]
        for upstream in upstreams:
            upstream.mode = "slow"  # two seconds each: the three overlap
        gateway = stack.enter_context(Gateway(upstreams))
        client = stack.enter_context(httpx.Client(base_url=gateway.url, timeout=30))
        wait_until(lambda: len(client.get("/v1/models").json()["data"]) == 2, timeout=10, what="the catalogue")
        served: list[str] = []

        def ask() -> None:
            served.append(client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": "hot"}}).json()["served_by"])

        threads = [threading.Thread(target=ask) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        return served, ring.owners("hot-v1", [u.name for u in upstreams])


def test_a_hot_adapter_goes_to_the_least_loaded_of_its_owners_and_a_plain_one_to_its_top_owner() -> None:
    spread, owners = concurrent_servers(3)
    assert sorted(spread) == sorted(owners)  # warmed on all three: one each, the least loaded first
    plain, owners = concurrent_servers(None)
    assert plain.count(owners[0]) >= 2  # the bounded-load pick: the top owner until it passes the bound, as before
