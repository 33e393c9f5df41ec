"""Tenants end to end: `lorafleet up`'s demo Tenants through the operator, the policy Secret, the gateway and real replicas."""

from __future__ import annotations

import time

import httpx
import pytest
from support.kube import pods
from support.metrics import metric
from support.waiting import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

# Long enough for several KV blocks; the cache is per (salt, adapter, tokens), so this is what another tenant would guess.
SECRET_PROMPT = "Internal memo for acme only: the merger with initech closes on the ninth, codename bluebird, do not share. " * 4


def call(url: str, key: str | None, adapter: str | None, prompt: str = "Hello", tokens: int = 2) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    parameters = {"max_new_tokens": tokens, **({"adapter_id": adapter} if adapter else {})}
    return httpx.post(url + "/generate", json={"inputs": prompt, "parameters": parameters}, headers=headers, timeout=60)


def test_demo_tenants_call_only_their_adapters_and_never_share_a_cached_prefix(tenant_fleet) -> None:
    kubectl, url, keys, output = tenant_fleet
    acme, globex = keys["acme"], keys["globex"]
    assert f"acme    key {acme}" in output and f"globex  key {globex}" in output  # printed by `lorafleet up`
    rows = {line.split()[0]: line.split() for line in kubectl("get", "tenants").stdout.splitlines()[1:]}
    assert rows["acme"][1:5] == ["smollm2", "Ready", "1", "2"] and rows["globex"][1:5] == ["smollm2", "Ready", "1", "2"]

    assert call(url, None, "pirate").status_code == 401 and call(url, "lf-acme-guessed-wrong", "pirate").status_code == 401
    assert call(url, acme, "pirate").status_code == 200 and call(url, acme, "support").status_code == 200 and call(url, acme, None).status_code == 200
    theirs, unknown = call(url, acme, "shouty"), call(url, acme, "no-such")
    assert (theirs.status_code, unknown.status_code) == (404, 404)
    assert theirs.json()["error"].replace("shouty", "X") == unknown.json()["error"].replace("no-such", "X")
    assert call(url, globex, "shouty").status_code == 200 and call(url, globex, "pirate").status_code == 404

    def models(key: str) -> list[str]:
        return [m["id"] for m in httpx.get(url + "/v1/models", headers={"authorization": f"Bearer {key}"}).json()["data"]]

    assert models(acme) == ["smollm2", "pirate", "support"] and models(globex) == ["smollm2", "shouty", "support"]

    # The timing oracle: the prefix cache's hits are what make a right guess fast. The shared adapter is one ring key,
    # so every request below meets the same replica and the same cache.
    replicas = [f"http://{p['status']['podIP']}:8080" for p in pods(kubectl).values()]

    def hits() -> float:
        return sum(metric(r, "vllm:prefix_cache_hits_total") for r in replicas)

    assert call(url, acme, "support", SECRET_PROMPT).status_code == 200
    before = hits()
    started = time.perf_counter()
    assert call(url, globex, "support", SECRET_PROMPT).status_code == 200  # globex guesses acme's prompt exactly
    guessed = time.perf_counter() - started
    assert hits() == before, "another tenant's request reused acme's cached blocks"
    started = time.perf_counter()
    assert call(url, acme, "support", SECRET_PROMPT).status_code == 200
    again = time.perf_counter() - started
    assert hits() - before >= 16, "acme's own repeat should reuse its cached blocks"
    print(f"guess by globex {guessed * 1e3:.1f} ms (no hit), repeat by acme {again * 1e3:.1f} ms (hit)")

    usage = httpx.get(url + "/metrics").text  # the gateway's own counters, by tenant
    assert 'lorafleet_gateway_tenant_requests_total{outcome="404",tenant="acme"} 2.0' in usage
    wait_until(lambda: "acme" in kubectl("get", "tenants", "-o", "wide").stdout, timeout=5, what="kubectl")
