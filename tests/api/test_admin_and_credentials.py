"""Who may change a replica's adapters, and where credentials go.

Load, pin and unload change what every client gets, so they take the replica's admin token; a
client's key (the gateway's bearer) never doubles as a Hub token; pins always leave a slot for the
adapters nobody pinned.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from support.hub import HubStandIn
from support.server import RunningServer, running_server

from lorafleet.testing import make_lora_adapter

ADMIN = {"authorization": "Bearer op-secret"}


@pytest.fixture(scope="module")
def adapter_root(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("admin-adapters")
    for i in range(3):
        make_lora_adapter(tiny_models["llama"], root / f"a{i}", r=4, seed=i)
    return root


@pytest.fixture(scope="module")
def server(tiny_models, adapter_root, tmp_path_factory):
    # Three slots: at most two pins.
    yield from running_server(tiny_models["llama"], adapter_root, tmp_path_factory.mktemp("cache"), admin_token="op-secret",
                              engine={"max_active_adapters": 3})


@pytest.mark.parametrize("headers", [{}, {"authorization": "Bearer client-key"}, {"authorization": "op-secret"}, {"authorization": "Bearer op-secret-2"}])
def test_admin_routes_refuse_anything_but_the_admin_token(server, headers) -> None:
    load = httpx.post(server.url + "/adapters", json={"adapter_id": "a0"}, headers=headers, timeout=30)
    unload = httpx.delete(server.url + "/adapters/a0", headers=headers, timeout=30)
    for response in (load, unload):
        assert response.status_code == 401, response.text
        assert response.json() == {"error": "this route needs the replica's admin token (Authorization: Bearer <admin token>)", "error_type": "unauthorized"}
    assert "local:a0" not in {a["key"] for a in httpx.get(server.url + "/adapters").json()}


def test_without_a_token_admin_routes_are_closed_and_say_how_to_open_them(tiny_models, adapter_root, tmp_path) -> None:
    """Secure by default: `lorafleet serve` with no --admin-token refuses every mutating admin route (and warm) with a 403."""
    with RunningServer(tiny_models["llama"], adapter_root, tmp_path / "cache", admin_open=False) as replica:
        answers = [httpx.post(replica.url + "/adapters", json={"adapter_id": "a0"}, timeout=30),
                   httpx.delete(replica.url + "/adapters/a0", timeout=30),
                   httpx.put(replica.url + "/adapters/catalogue", json={"adapters": []}, timeout=30),
                   httpx.post(replica.url + "/adapters/warm", json={"adapter_id": "a0"}, headers={"authorization": "Bearer x"}, timeout=30)]
        for response in answers:
            assert response.status_code == 403, response.text
            assert response.json()["error_type"] == "forbidden" and "--admin-open" in response.json()["error"]
        assert "--admin-token (LORAFLEET_ADMIN_TOKEN)" in answers[0].json()["error"] and "--warm-token" in answers[3].json()["error"]
        assert httpx.get(replica.url + "/adapters", timeout=30).json() == []  # nothing was loaded
        assert httpx.post(replica.url + "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "a0", "max_new_tokens": 2}},
                          timeout=30).status_code == 200  # requests still load adapters on demand


def test_warm_takes_the_warm_token_which_opens_nothing_else_and_is_rate_limited(tiny_models, adapter_root, tmp_path, monkeypatch) -> None:
    from lorafleet.server.api import admin

    monkeypatch.setattr(admin, "WARM_BURST", 3)
    monkeypatch.setattr(admin, "WARM_RATE_PER_S", 0.5)
    with RunningServer(tiny_models["llama"], adapter_root, tmp_path / "cache", admin_token="op-secret", warm_token="gw-warm") as replica:
        warm = {"authorization": "Bearer gw-warm"}
        refused = httpx.post(replica.url + "/adapters/warm", json={"adapter_id": "a0"}, headers={"authorization": "Bearer client"}, timeout=30)
        assert refused.status_code == 401 and "warm token" in refused.json()["error"]
        assert httpx.post(replica.url + "/adapters", json={"adapter_id": "a0"}, headers=warm, timeout=30).status_code == 401
        assert httpx.delete(replica.url + "/adapters/a0", headers=warm, timeout=30).status_code == 401
        answers = [httpx.post(replica.url + "/adapters/warm", json={"adapter_id": f"a{i % 3}"}, headers=warm if i else ADMIN, timeout=30)
                   for i in range(5)]
        assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
        assert int(answers[3].headers["retry-after"]) >= 1 and "warms a second" in answers[3].json()["error"]


def test_pins_leave_one_slot_for_everyone_else(server) -> None:
    for name in ("a0", "a1"):
        response = httpx.post(server.url + "/adapters", json={"adapter_id": name, "pin": True}, headers=ADMIN, timeout=30)
        assert response.status_code == 200 and response.json()["pinned"] is True
    third = httpx.post(server.url + "/adapters", json={"adapter_id": "a2", "pin": True}, headers=ADMIN, timeout=30)
    assert third.status_code == 409
    assert third.json()["error_type"] == "conflict" and "2 adapters are pinned and at most 2 may be" in third.json()["error"]
    served = httpx.post(server.url + "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": "a2", "max_new_tokens": 2}}, timeout=30)
    assert served.status_code == 200  # the free slot serves the unpinned adapter
    assert httpx.get(server.url + "/info").json()["max_pinned_adapters"] == 2
    assert httpx.delete(server.url + "/adapters/a0", headers=ADMIN, timeout=30).status_code == 200
    assert httpx.post(server.url + "/adapters", json={"adapter_id": "a2", "pin": True}, headers=ADMIN, timeout=30).status_code == 200


def test_a_client_bearer_never_reaches_the_hub(tiny_models, adapter_root, tmp_path, monkeypatch) -> None:
    """Behind a gateway, Authorization carries the gateway's key; only `api_token` is a Hub token."""
    with HubStandIn() as hub:
        hub.repos["acme/secret"] = adapter_root / "a1"
        hub.private["acme/secret"] = "hf_right"
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with RunningServer(tiny_models["llama"], adapter_root, tmp_path / "cache", adapter_source="hub") as replica:
            body = {"inputs": "Hi", "parameters": {"adapter_id": "acme/secret", "max_new_tokens": 2}}
            refused = httpx.post(replica.url + "/generate", json=body, headers={"authorization": "Bearer gateway-key"}, timeout=60)
            assert refused.status_code == 404
            assert "Bearer gateway-key" not in hub.authorizations
            body["parameters"]["api_token"] = "hf_right"
            assert httpx.post(replica.url + "/generate", json=body, timeout=60).status_code == 200
            assert "Bearer hf_right" in hub.authorizations


def test_preloaded_adapters_are_resident_and_pinned_before_the_first_request(tiny_models, adapter_root, tmp_path) -> None:
    """--preload-adapter: loaded and pinned during start-up, so /health answers only once they are on the device."""
    with RunningServer(tiny_models["llama"], adapter_root, tmp_path / "cache", preload_adapters=["a1", "a2"],
                       engine={"max_active_adapters": 3}) as server:
        listed = {a["id"]: a for a in httpx.get(server.url + "/adapters").json()}
        assert {k: (v["tier"], v["pinned"]) for k, v in listed.items()} == {"a1": ("device", True), "a2": ("device", True)}
        events = httpx.get(server.url + "/metrics").text
        assert 'lorafleet_requests_total{adapter="a1"' not in events  # no request brought them in


def test_a_load_names_its_revision_and_an_unload_by_key_leaves_other_versions(server) -> None:
    """The operator loads the version an Adapter names (``revision`` as its own field: a local path has no '@'),
    and unloads by the version's key, so the previous revision can leave while the new one serves."""
    for revision in ("v1", "v2"):
        loaded = httpx.post(server.url + "/adapters", json={"adapter_id": "a1", "adapter_source": "local", "revision": revision},
                            headers=ADMIN, timeout=30)
        assert loaded.status_code == 200 and loaded.json()["key"] == f"local:a1@{revision}", loaded.text
    listing = {a["key"]: a for a in httpx.get(server.url + "/adapters").json()}
    assert {"local:a1@v1", "local:a1@v2"} <= set(listing)
    # the content digest: one folder read under two revisions is one content; another adapter is another
    assert listing["local:a1@v1"]["digest"] == listing["local:a1@v2"]["digest"] and listing["local:a1@v1"]["digest"].startswith("blake2b:")
    other = httpx.post(server.url + "/adapters", json={"adapter_id": "a2", "adapter_source": "local"}, headers=ADMIN, timeout=30).json()
    assert other["digest"] != listing["local:a1@v1"]["digest"]
    assert httpx.delete(server.url + "/adapters/local:a1@v1", headers=ADMIN, timeout=30).status_code == 200
    keys = {a["key"] for a in httpx.get(server.url + "/adapters").json() if a["tier"] != "disk"}
    assert "local:a1@v2" in keys and "local:a1@v1" not in keys
    conflict = httpx.post(server.url + "/adapters", json={"adapter_id": "org/x@v1", "adapter_source": "hub", "revision": "v2"},
                          headers=ADMIN, timeout=30)
    assert conflict.status_code == 422 and "give one" in conflict.json()["error"]


def test_info_reports_every_setting_but_never_a_token(server) -> None:
    """/info is made from the settings' declarations; the admin and warm tokens are declared secret."""
    info = httpx.get(server.url + "/info", timeout=30).json()
    assert "op-secret" not in json.dumps(info) and "admin_token" not in info and "warm_token" not in info
    assert info["admin_auth"] is True and info["max_lora_rank"] == 16 and info["block_size"] == 4 and info["prefix_caching"] is True


def test_a_load_completes_while_listings_keep_the_engine_busy(server) -> None:
    """An admin load is one future the engine thread settles; a steady stream of other commands (a gateway probing
    every 0.2 s, an operator listing) must not keep it from settling (it did: the warm hung until the client gave up)."""
    import threading

    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            while not stop.is_set():
                client.get("/adapters")

    probes = [threading.Thread(target=probe) for _ in range(3)]
    for thread in probes:
        thread.start()
    try:
        httpx.delete(server.url + "/adapters/a1", headers=ADMIN, timeout=30)
        loaded = httpx.post(server.url + "/adapters", json={"adapter_id": "a1", "adapter_source": "local"}, headers=ADMIN, timeout=15)
        assert loaded.status_code == 200 and loaded.json()["tier"] == "device"
    finally:
        stop.set()
        for thread in probes:
            thread.join(10)
