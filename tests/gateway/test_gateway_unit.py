"""The gateway's pure parts: routing keys, EndpointSlice parsing, API keys, ejection."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from lorafleet.gateway.auth import ApiKeys
from lorafleet.gateway.discovery import members_from_slices, static_members
from lorafleet.gateway.hot_adapters import HotAdapters
from lorafleet.gateway.replicas import ReplicaSet
from lorafleet.gateway.request_keys import prompt_start, request_payload, routing_key


@pytest.mark.parametrize(
    "path,body,key",
    [
        ("/generate", {"inputs": "x", "parameters": {"adapter_id": "org/a"}}, "org/a"),
        ("/", {"inputs": "x", "parameters": {"adapter_id": "org/a", "adapter_source": "hub"}}, "org/a"),
        ("/generate_stream", {"inputs": "x", "parameters": {"adapter_id": ""}}, None),
        ("/generate", {"inputs": "x", "parameters": {"merged_adapters": {"ids": ["b", "a"]}}}, "merged:a,b"),
        ("/generate", {"inputs": "x"}, None),
        ("/v1/completions", {"model": "org/a", "prompt": "x"}, "org/a"),
        ("/v1/chat/completions", {"model": "base-model", "messages": []}, None),
        ("/v1/chat/completions", {"model": "", "messages": []}, None),
        ("/tokenize", {"inputs": "x", "parameters": {"adapter_id": "org/a"}}, None),
        ("/generate", "not json", None),
    ],
)
def test_routing_key(path: str, body, key) -> None:
    raw = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    assert routing_key(path, request_payload(path, raw), {"base-model"}) == key


@pytest.mark.parametrize(("path", "body", "start"), [
    ("/generate", {"inputs": "You are a pirate. Say hi", "parameters": {}}, "You are a pirate"),
    ("/v1/completions", {"model": "m", "prompt": ["You are a pirate. Say hi", "other"]}, "You are a pirate"),
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "system", "content": "Be brief"}]}, '[{"role":"system'),
    ("/generate", {"parameters": {}}, None),
    ("/generate", "not json", None),
])
def test_prompt_start_reads_each_apis_prompt(path: str, body, start) -> None:
    raw = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
    assert prompt_start(path, request_payload(path, raw), 16) == start


def test_members_from_endpoint_slices_use_pod_names_and_skip_unready() -> None:
    slices = [{
        "ports": [{"name": "http", "port": 8080}],
        "endpoints": [
            {"addresses": ["10.0.0.5"], "conditions": {"ready": True}, "targetRef": {"kind": "Pod", "name": "fleet-abc"}},
            {"addresses": ["10.0.0.6"], "conditions": {"ready": False}, "targetRef": {"kind": "Pod", "name": "fleet-def"}},
            {"addresses": ["10.0.0.7"], "conditions": {"ready": True, "terminating": True}, "targetRef": {"name": "fleet-old"}},
            {"addresses": ["fd00::1"], "conditions": {}},
        ],
    }]
    assert members_from_slices(slices) == {"fleet-abc": "http://10.0.0.5:8080", "fd00::1": "http://[fd00::1]:8080"}
    assert static_members(["http://127.0.0.2:8080", "127.0.0.3:9000"]) == {"127.0.0.2:8080": "http://127.0.0.2:8080", "127.0.0.3:9000": "http://127.0.0.3:9000"}


def test_api_keys_reload_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team keys\nsecret-one\n")
    keys = ApiKeys(path)
    assert keys.allows("Bearer secret-one") and not keys.allows("Bearer nope") and not keys.allows(None)
    path.write_text("secret-two\n")
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert keys.allows("Bearer secret-two") and not keys.allows("Bearer secret-one")
    assert ApiKeys(None).allows(None)


def test_repeated_failures_eject_and_all_ejected_still_routes() -> None:
    ejected = []
    replicas = ReplicaSet(eject_after=2, eject_seconds=30, on_eject=lambda: ejected.append(1))
    replicas.update({"a": "http://a", "b": "http://b"})
    replicas.failed(replicas.replicas["a"])
    assert set(replicas.routable()) == {"a", "b"}
    replicas.failed(replicas.replicas["a"])
    assert set(replicas.routable()) == {"b"} and len(ejected) == 1
    replicas.failed(replicas.replicas["b"])
    replicas.failed(replicas.replicas["b"])
    assert set(replicas.routable()) == {"a", "b"}  # nothing healthy: try them all rather than refuse


async def test_active_probes_eject_a_dead_replica_and_bring_it_back() -> None:
    import httpx

    alive = {"a": True, "b": False}

    def answer(request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if not alive[host]:
            raise httpx.ConnectError("refused", request=request)
        if request.url.path == "/info":
            return httpx.Response(200, json={"model_id": "base"})
        return httpx.Response(200)

    replicas = ReplicaSet(eject_after=3, eject_seconds=30)
    replicas.update({"a": "http://a", "b": "http://b"})
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await asyncio.gather(*(replicas._probe(client, r) for r in replicas.replicas.values()))
        assert set(replicas.routable()) == {"a"} and replicas.base_model_ids() == {"base"}
        alive["b"] = True
        await replicas._probe(client, replicas.replicas["b"])
        assert set(replicas.routable()) == {"a", "b"}


def test_hot_adapters_follow_each_replicas_lru_and_its_reports() -> None:
    hot = HotAdapters()
    hot.set_slots("r1", 2)
    for key in ["a", "b", "a", "c"]:  # r1 holds two: "b" is its least recently used when "c" arrives
        hot.used("r1", key)
    hot.used("r2", "a")
    assert hot.holders("a") == {"r1", "r2"} and hot.holders("b") == set() and hot.holders("c") == {"r1"}
    hot.replace("r2", ["x", "y"])  # what r2 reported on its last probe
    assert hot.holders("a") == {"r1"} and hot.holders("x") == {"r2"} and hot.count("r2") == 2
    hot.set_slots("r2", 1)  # the oldest report goes first
    assert hot.holders("x") == set() and hot.holders("y") == {"r2"}
    hot.retain(["r2"])  # r1 left the fleet
    assert hot.holders("a") == set() and hot.holders("c") == set() and hot.count("r1") == 0


async def test_probes_read_each_replicas_hot_adapters() -> None:
    import httpx

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/info":
            return httpx.Response(200, json={"model_id": "base", "max_active_adapters": 2})
        if request.url.path == "/adapters" and request.url.host == "a":
            assert request.url.params.get_list("tier") == ["device", "loading", "cpu"]
            return httpx.Response(200, json=[{"id": "old", "revision": None, "last_used_s_ago": 9.0, "tier": "device"},
                                             {"id": "org/new", "revision": "v2", "last_used_s_ago": 0.5, "tier": "loading"},
                                             {"id": "in-memory", "revision": None, "last_used_s_ago": 30.0, "tier": "cpu"}])
        if request.url.path == "/adapters":
            return httpx.Response(404, json={"error": "not a lorafleet replica"})
        return httpx.Response(200)

    replicas = ReplicaSet()
    replicas.update({"a": "http://a", "b": "http://b"})
    replicas.hot.used("b", "guessed")  # b has no admin routes: the guess from traffic stays
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        await asyncio.gather(*(replicas._probe(client, r) for r in replicas.replicas.values()))
    assert replicas.hot.holders("old") == {"a"} and replicas.hot.holders("org/new@v2") == {"a"}
    # a hand-off of it asks for exactly that version (it sent "org/new@v2" as a bare id, which a local path cannot carry)
    assert replicas.hot.ref("org/new@v2").load_body() == {"adapter_id": "org/new", "adapter_source": "hub", "pin": False, "revision": "v2"}
    assert replicas.hot.holders("in-memory") == set() and replicas.hot.warm_holders("in-memory") == {"a"}  # CPU tier: warm, not hot
    assert replicas.hot.holders("guessed") == {"b"} and set(replicas.routable()) == {"a", "b"}
    replicas.hot.used("a", "third")  # two slots: the least recently used report ("old") is evicted
    assert replicas.hot.holders("old") == set()


def test_the_adapter_blind_policies_rotate_and_balance() -> None:
    from lorafleet.gateway.config import GatewayConfig
    from lorafleet.gateway.proxy import Gateway

    rr = Gateway(ReplicaSet(), None, None, None, GatewayConfig(policy="round-robin"))
    loads = {"a": 5, "b": 0, "c": 2}
    assert [rr._plain_order(loads)[0] for _ in range(6)] == ["b", "c", "a", "b", "c", "a"]  # whatever the loads
    ll = Gateway(ReplicaSet(), None, None, None, GatewayConfig(policy="least-loaded"))
    assert ll._plain_order(loads) == ["b", "c", "a"]
    assert {ll._plain_order({"a": 0, "b": 0, "c": 0})[0] for _ in range(3)} == {"a", "b", "c"}  # ties take turns


def test_a_registered_name_routes_by_its_id_and_models_lists_each_once() -> None:
    from lorafleet.gateway.catalogue import Catalogue

    catalogue = Catalogue()
    catalogue.entries = [{"name": "pirate", "id": "team/pirate", "source": "hub", "revision": "v2"}]
    catalogue.keys = {"pirate": "team/pirate@v2"}
    assert catalogue.key_for("pirate") == "team/pirate@v2" and catalogue.key_for("other/x") == "other/x" and catalogue.key_for(None) is None
    assert catalogue.models("smol", 1)["data"] == [
        {"id": "smol", "object": "model", "created": 1, "owned_by": "lorafleet", "root": "smol", "parent": None},
        {"id": "pirate", "object": "model", "created": 1, "owned_by": "lorafleet", "root": "team/pirate", "parent": "smol"}]


def test_cpu_tier_holders_follow_each_replicas_report() -> None:
    hot = HotAdapters()
    hot.replace_warm("r1", ["a", "b"])
    hot.replace_warm("r2", ["b"])
    assert hot.warm_holders("a") == {"r1"} and hot.warm_holders("b") == {"r1", "r2"}
    hot.replace_warm("r1", ["c"])  # r1's next report: a and b left its CPU tier
    assert hot.warm_holders("a") == set() and hot.warm_holders("b") == {"r2"} and hot.warm_holders("c") == {"r1"}
    hot.retain(["r1"])  # r2 left the fleet
    assert hot.warm_holders("b") == set()


def test_each_routing_result_is_named_as_the_metric_counts_it() -> None:
    """The routing counter's labels: the top owner, another replica holding it hot, a spill elsewhere, no adapter."""
    from lorafleet.gateway.proxy import Gateway

    assert Gateway._placement("r1", "r1", set()) == "owner"
    assert Gateway._placement("r2", "r1", {"r2"}) == "hot"
    assert Gateway._placement("r3", "r1", {"r2"}) == "spill"
    assert Gateway._placement("r1", None, set()) == "none"
