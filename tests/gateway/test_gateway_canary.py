"""The gateway splits a name's traffic between its stable version and its canary as the catalogue says (no model)."""

from __future__ import annotations

import contextlib
import json
from collections import Counter

import httpx
import pytest
from support.upstream import CatalogueUpstream, Gateway
from support.waiting import wait_until

from lorafleet import ring
from lorafleet.traffic_split import VARIANT_HEADER

pytestmark = pytest.mark.e2e  # servers on loopback


def side(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    chosen = json.loads(response.json()["headers"][VARIANT_HEADER])  # every registered name: the version routed by, whole
    return {"fr-v1": "stable", "de-v1": "stable", "fr-v2": "canary", "de-v2": "canary"}[chosen["id"]]


def test_a_ten_percent_canary_gets_ten_percent_and_sticky_callers_never_flip() -> None:
    entries = [{"name": "fr", "id": "fr-v1", "source": "local", "revision": None,
                "canary": {"id": "fr-v2", "source": "local", "revision": None, "weight": 10, "stickiness": "none"}},
               {"name": "de", "id": "de-v1", "source": "local", "revision": None,
                "canary": {"id": "de-v2", "source": "local", "revision": None, "weight": 10, "stickiness": "header", "header": "x-user"}}]
    with contextlib.ExitStack() as stack:
        upstreams = [stack.enter_context(CatalogueUpstream(entries)) for _ in range(3)]
        names = [u.name for u in upstreams]
        gateway = stack.enter_context(Gateway(upstreams))
        with httpx.Client(base_url=gateway.url, timeout=30) as client:
            def ask(name: str, headers: dict | None = None) -> httpx.Response:
                return client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": name}}, headers=headers or {})

            wait_until(lambda: side(ask("fr", {VARIANT_HEADER: "canary"})) is not None and len(client.get("/v1/models").json()["data"]) == 3,
                       timeout=10, what="the gateway reading the catalogue")
            served = [ask("fr") for _ in range(1000)]
            sides = Counter(side(r) for r in served)
            assert 70 <= sides["canary"] <= 130, sides
            # each side is routed by its own version's key: the canary to the canary's owner, stable to stable's
            owner = {s: ring.owners(key, names, 1)[0] for s, key in (("canary", "fr-v2"), ("stable", "fr-v1"))}
            assert {(side(r), r.json()["served_by"]) for r in served} == {(s, owner[s]) for s in ("canary", "stable")}

            first = {f"user-{i}": side(ask("de", {"x-user": f"user-{i}"})) for i in range(300)}
            assert 15 <= sum(s == "canary" for s in first.values()) <= 55
            again = {user: side(ask("de", {"x-user": user})) for user in first for _ in range(2)}
            assert again == first  # nobody flipped

            # a client cannot pick the canary itself: its own variant header never reaches a replica
            on_stable = next(user for user, s in first.items() if s == "stable")
            forced = Counter(side(ask("de", {VARIANT_HEADER: '{"id": "de-v2", "source": "local"}', "x-user": on_stable})) for _ in range(20))
            assert forced == Counter({"stable": 20})
