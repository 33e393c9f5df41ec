"""Tenants at the gateway (issue 32, the gateway's half): who may call what, how much, and whose cache they share."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest
from support.metrics import metric_values
from support.server import free_port
from support.upstream import CatalogueUpstream, Gateway
from support.waiting import wait_until

from lorafleet.bearer import key_hash
from lorafleet.cache_salt import SALT_HEADER
from lorafleet.gateway.tenants import Tenants

pytestmark = pytest.mark.e2e  # servers on loopback

ENTRIES = [{"name": n, "id": f"{n}-folder", "source": "local", "revision": None} for n in ("acme-fr", "beta-de", "common")]


def policy(rpm: float | None = None, concurrent: int | None = None, acme_keys: tuple[str, ...] = ("acme-1", "acme-2"),
           tpm: float | None = None, tpd: float | None = None, enforce: bool = True) -> dict:
    limits = (("requestsPerMinute", rpm), ("concurrentRequests", concurrent), ("tokensPerMinute", tpm), ("tokensPerDay", tpd))
    return {"enforce": enforce, "shared": ["common"], "tenants": [
        {"name": "acme", "keyHashes": [key_hash(k) for k in acme_keys], "adapters": ["acme-fr"], "base": True},
        {"name": "beta", "keyHashes": [key_hash("beta-1")], "adapters": ["beta-de"], "base": False},
        {"name": "open-1", "keyHashes": [key_hash("open-1")], "adapters": [], "base": True, "cache": "Shared"},
        {"name": "open-2", "keyHashes": [key_hash("open-2")], "adapters": [], "base": True, "cache": "Shared"},
        {"name": "limited", "keyHashes": [key_hash("lim-1")], "adapters": ["common"], "base": True,
         "limits": {k: v for k, v in limits if v is not None}}]}


def write(path: Path, body: dict) -> None:
    path.write_text(json.dumps(body))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # a new mtime even within the clock's tick


@contextlib.contextmanager
def fleet(tmp_path: Path, body: dict, mode: str = "ok", **config):
    path = tmp_path / "tenants.json"
    write(path, body)
    with contextlib.ExitStack() as stack:
        upstreams = [stack.enter_context(CatalogueUpstream(ENTRIES)) for _ in range(2)]
        for upstream in upstreams:
            upstream.mode, upstream.usage = mode, [(b"x-prompt-tokens", b"3"), (b"x-generated-tokens", b"2")]
        gateway = stack.enter_context(Gateway(upstreams, tenants_file=path, warm_token="hop", **config))
        client = stack.enter_context(httpx.Client(base_url=gateway.url, timeout=30))
        wait_until(lambda: len(client.get("/v1/models", headers=auth("lim-1")).json()["data"]) >= 2, timeout=10, what="the catalogue read")
        yield client, path


def auth(key: str) -> dict:
    return {"authorization": f"Bearer {key}"}


def ask(client: httpx.Client, key: str, adapter: str | None) -> httpx.Response:
    return client.post("/generate", json={"inputs": "hi", "parameters": {"adapter_id": adapter} if adapter else {}}, headers=auth(key))


def test_a_tenant_calls_its_own_and_shared_adapters_and_nothing_else_is_confirmed_to_exist(tmp_path) -> None:
    with fleet(tmp_path, policy()) as (client, _):
        assert ask(client, "acme-1", "acme-fr").status_code == 200 and ask(client, "acme-2", "common").status_code == 200
        assert ask(client, "acme-1", None).status_code == 200  # acme may call the base model
        theirs, unknown = ask(client, "acme-1", "beta-de"), ask(client, "acme-1", "no-such-adapter")
        assert (theirs.status_code, unknown.status_code) == (404, 404)
        assert theirs.json()["error"].replace("beta-de", "X") == unknown.json()["error"].replace("no-such-adapter", "X")
        assert ask(client, "acme-1", "org/any-hub-id").status_code == 404  # a restricted key cannot load arbitrary ids
        assert ask(client, "beta-1", None).status_code == 404 and ask(client, "beta-1", "beta-de").status_code == 200
        assert ask(client, "nobody", "common").status_code == 401 and client.post("/generate", json={"inputs": "hi"}).status_code == 401
        models = {key: [m["id"] for m in client.get("/v1/models", headers=auth(key)).json()["data"]] for key in ("acme-1", "beta-1")}
        assert models["acme-1"][1:] == ["acme-fr", "common"] and len(models["acme-1"]) == 3  # the base model, then its two
        assert models["beta-1"] == ["beta-de", "common"]  # no base model for beta
        assert client.get("/v1/models", headers=auth("nobody")).status_code == 401
        usage = metric_values(client.get("/metrics").text)
        assert usage['lorafleet_gateway_tenant_requests_total{outcome="200",tenant="acme"}'] == 3
        assert usage['lorafleet_gateway_tenant_requests_total{outcome="404",tenant="acme"}'] == 3
        assert usage['lorafleet_gateway_tenant_requests_total{outcome="200",tenant="beta"}'] == 1
        assert usage['lorafleet_gateway_tenant_tokens_total{kind="prompt",tenant="acme"}'] == 3 * 3
        assert usage['lorafleet_gateway_tenant_tokens_total{kind="generated",tenant="acme"}'] == 3 * 2
        assert not any('tenant="nobody"' in k for k in usage)  # an unknown key is counted under no tenant

def test_a_tenants_keys_share_its_prefix_cache_and_no_one_else_does(tmp_path) -> None:
    with fleet(tmp_path, policy()) as (client, _):
            salts = {key: ask(client, key, "common").json()["headers"][SALT_HEADER] for key in ("acme-1", "acme-2", "beta-1", "open-1", "open-2")}
    assert salts["acme-1"] == salts["acme-2"] != salts["beta-1"]
    assert salts["open-1"] == salts["open-2"] and salts["open-1"] not in (salts["acme-1"], salts["beta-1"])  # cache scope Shared


def test_requests_per_minute_at_the_bound_and_over_it(tmp_path) -> None:
    with fleet(tmp_path, policy(rpm=3)) as (client, _):
        assert [ask(client, "lim-1", "common").status_code for _ in range(3)] == [200, 200, 200]
        over = ask(client, "lim-1", "common")
        assert over.status_code == 429 and "requestsPerMinute 3" in over.json()["error"]
        assert 1 <= int(over.headers["retry-after"]) <= 20  # one request's worth of a 3-a-minute bucket
        assert ask(client, "acme-1", "common").status_code == 200  # another tenant is not slowed


def test_concurrent_requests_at_the_bound_and_over_it(tmp_path) -> None:
    with fleet(tmp_path, policy(concurrent=1), mode="slow") as (client, _):
        first: list[int] = []
        running = threading.Thread(target=lambda: first.append(ask(client, "lim-1", "common").status_code))
        running.start()
        wait_until(lambda: client.get("/replicas", headers=auth("acme-1")).json()["replicas"][0]["in_flight"]
                   + client.get("/replicas", headers=auth("acme-1")).json()["replicas"][1]["in_flight"] == 1, timeout=5, what="one in flight")
        over = ask(client, "lim-1", "common")
        running.join()
        assert first == [200] and over.status_code == 429 and "concurrentRequests 1" in over.json()["error"]
        assert ask(client, "lim-1", "common").status_code == 200  # the slot is free again


def test_a_rotated_key_stops_working_at_the_next_request(tmp_path) -> None:
    with fleet(tmp_path, policy()) as (client, path):
        assert ask(client, "acme-1", "acme-fr").status_code == 200
        write(path, policy(acme_keys=("acme-2", "acme-3")))  # what the operator writes when the Secret changes
        assert ask(client, "acme-1", "acme-fr").status_code == 401 and ask(client, "acme-3", "acme-fr").status_code == 200


def test_each_gateway_enforces_its_share_of_a_limit(tmp_path) -> None:
    path = tmp_path / "t.json"
    write(path, policy(rpm=4, concurrent=3))
    tenant = Tenants(path, gateways=2).tenant_for("Bearer lim-1")
    assert (tenant.limits.requests_per_minute, tenant.limits.concurrent) == (2.0, 2)
    assert [tenant.admit(0.0) for _ in range(2)] == [None, None] and tenant.admit(0.0)[0] == "concurrentRequests 2"
    tenant.done(), tenant.done()
    assert tenant.admit(0.0)[0] == "requestsPerMinute 2"


def test_tokens_per_minute_at_the_bound_and_over_it_counting_streamed_tokens(tmp_path) -> None:
    with fleet(tmp_path, policy(tpm=10), mode="stream") as (client, _):
        streamed = client.post("/generate_stream", json={"inputs": "hi", "parameters": {"adapter_id": "common"}}, headers=auth("lim-1"))
        assert streamed.status_code == 200 and streamed.text.startswith("data:1")  # the usage comment is relayed, and ignored by clients
        assert ask(client, "lim-1", "common").status_code == 200  # 3 + 2 tokens spent of 10: credit left
        over = ask(client, "lim-1", "common")  # 10 of 10 spent (the stream's 2 generated tokens were counted)
        assert over.status_code == 429 and "tokensPerMinute 10" in over.json()["error"]
        assert 1 <= int(over.headers["retry-after"]) <= 7  # one token's worth of a 10-a-minute bucket
        usage = metric_values(client.get("/metrics").text)
        assert usage['lorafleet_gateway_tenant_tokens_total{kind="generated",tenant="limited"}'] == 4
        assert usage['lorafleet_gateway_tenant_requests_total{outcome="429",tenant="limited"}'] == 1


def test_a_daily_token_budget_refuses_until_midnight_utc(tmp_path) -> None:
    with fleet(tmp_path, policy(tpd=6)) as (client, _):
        assert [ask(client, "lim-1", "common").status_code for _ in range(2)] == [200, 200]  # 5, then 10 of 6: the last one fits
        over = ask(client, "lim-1", "common")
        assert over.status_code == 429 and "tokensPerDay 6" in over.json()["error"]
        assert 1 <= int(over.headers["retry-after"]) <= 86400
        assert ask(client, "acme-1", "common").status_code == 200


def test_a_policy_that_does_not_enforce_leaves_the_gateway_open(tmp_path) -> None:
    with fleet(tmp_path, policy(enforce=False)) as (client, path):
        assert ask(client, "nobody", "beta-de").status_code == 200 and client.post("/generate", json={"inputs": "hi"}).status_code == 200
        write(path, policy())  # the first Tenant of the fleet was created
        assert ask(client, "nobody", "beta-de").status_code == 401 and ask(client, "beta-1", "beta-de").status_code == 200


def test_a_gateway_with_a_metrics_port_keeps_its_tenant_usage_off_the_api_port(tmp_path) -> None:
    path = tmp_path / "t.json"
    write(path, policy())
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "gateway", "--replica", "http://127.0.0.1:9", "--port", str(port),
                                "--metrics-port", str(metrics_port), "--tenants-file", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).status_code == 200, timeout=30, what="the metrics port")
        # The API port opens after the metrics port (the metrics thread starts first): any answer will do.
        wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code in (200, 503), timeout=30, what="the API port")
        assert "lorafleet_gateway_tenant_requests" in httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 404
    finally:
        process.terminate()
        process.wait(10)


def test_two_gateways_together_admit_exactly_the_fleet_wide_limit(tmp_path) -> None:
    path = tmp_path / "t.json"
    write(path, policy(rpm=4))
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(CatalogueUpstream(ENTRIES))
        clients = [stack.enter_context(httpx.Client(base_url=stack.enter_context(Gateway([upstream], tenants_file=path, tenant_gateways=2)).url,
                                                    timeout=30)) for _ in range(2)]
        for client in clients:
            wait_until(lambda c=client: len(c.get("/v1/models", headers=auth("lim-1")).json()["data"]) >= 2, timeout=10, what="the catalogue")
        answered = [ask(client, "lim-1", "common").status_code for _ in range(3) for client in clients]  # spread over both
    assert sorted(answered) == [200] * 4 + [429] * 2  # 4 a minute fleet-wide: 2 through each
