"""The gateway in front of real replicas (`lorafleet serve` processes on 127.0.0.2-4, tiny model)."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support.metrics import metric
from support.server import ThreadedApp, adapter_events, wait_healthy
from support.waiting import wait_until

from lorafleet import ring
from lorafleet.gateway.app import create_gateway_app
from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

ADDRESSES = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]


def port_on(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


# The replicas' credentials, as the operator hands them out: the admin token to the tests (in its place), the
# warm token to the gateway, whose hand-offs must carry it.
ADMIN = {"authorization": "Bearer e2e-admin"}
REPLICA_ENV = {**os.environ, "LORAFLEET_ADMIN_TOKEN": "e2e-admin", "LORAFLEET_WARM_TOKEN": "e2e-warm"}


def start_replica(address: str, model: Path, adapters: Path, cache: Path) -> tuple[subprocess.Popen, str]:
    port = port_on(address)
    process = subprocess.Popen(
        [sys.executable, "-P", "-m", "lorafleet", "serve", "--model", str(model), "--host", address, "--port", str(port),
         "--adapter-root", str(adapters), "--adapter-source", "local", "--adapter-cache-dir", str(cache), "--max-lora-rank", "16"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=REPLICA_ENV,
    )
    return process, f"http://{address}:{port}"


class GatewayThread(ThreadedApp):
    def __init__(self, urls: list[str], **kwargs) -> None:
        super().__init__(create_gateway_app(urls, probe_interval=0.2, warm_token="e2e-warm", **kwargs))


@pytest.fixture(scope="module")
def fleet_root(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet-adapters")
    for i in range(7):  # ad6 is only ever used by the pre-warm test
        make_lora_adapter(tiny_models["llama"], root / f"ad{i}", r=4, seed=i)
    return root


@pytest.fixture(scope="module")
def fleet(tiny_models: dict[str, Path], fleet_root: Path, tmp_path_factory: pytest.TempPathFactory):
    root = fleet_root
    started = [start_replica(a, tiny_models["llama"], root, tmp_path_factory.mktemp(f"cache-{a}")) for a in ADDRESSES]
    try:
        for process, url in started:
            wait_healthy(url, process)
        yield started
    finally:
        for process, _ in started:
            if process.poll() is None:
                process.kill()
                process.wait(10)


def generate(url: str, adapter: str | None, **extra) -> httpx.Response:
    parameters = {"max_new_tokens": 4, **({"adapter_id": adapter} if adapter else {}), **extra}
    return httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": parameters}, timeout=60)


def test_one_adapter_always_lands_on_the_same_replica(fleet) -> None:
    with GatewayThread([url for _, url in fleet]) as gateway:
        served = {}
        for adapter in [f"ad{i}" for i in range(6)]:
            replicas = {generate(gateway.url, adapter).headers["x-lorafleet-replica"] for _ in range(5)}
            assert len(replicas) == 1, f"{adapter} was served by {replicas}"
            served[adapter] = replicas.pop()
        assert len(set(served.values())) >= 2  # six adapters spread over the three replicas
        base = generate(gateway.url, None)
        assert base.status_code == 200 and base.headers["x-lorafleet-replica"]
        assert {r["name"] for r in httpx.get(gateway.url + "/replicas").json()["replicas"]} == {u.split("//")[1] for _, u in fleet}
        lines = httpx.get(gateway.url + "/metrics").text.splitlines()
        # By value: one at a time, every adapter request went to its top owner, and the base request has no owner.
        assert 'lorafleet_gateway_routing_total{result="owner"} 30.0' in lines and 'lorafleet_gateway_routing_total{result="none"} 1.0' in lines
        assert not any(line.startswith('lorafleet_gateway_routing_total{result="spill"}') and not line.endswith(" 0.0") for line in lines)


def test_prefix_routing_sends_one_prompt_prefix_to_the_replica_that_cached_it(fleet) -> None:
    """--prefix-chars: the ring key is the adapter and the prompt's start, so one tenant's system prompt meets
    its own cached KV blocks; without it, base requests go wherever load says, prompt unseen."""
    tenants = [f"Tenant {i} system prompt: you answer questions about product line {i} politely and briefly. " for i in range(10)]

    def ask(url: str, tenant: str, question: str) -> httpx.Response:
        return httpx.post(url + "/generate", json={"inputs": tenant + question, "parameters": {"max_new_tokens": 2}}, timeout=60)

    def hits() -> float:
        return sum(metric(url, "vllm:prefix_cache_hits_total") for _, url in fleet)

    with GatewayThread([url for _, url in fleet], prefix_chars=64) as gateway:
        before, served = hits(), {}
        for tenant in tenants:
            replicas = {ask(gateway.url, tenant, q).headers["x-lorafleet-replica"] for q in ("Hi?", "Price?", "Colour?")}
            assert len(replicas) == 1, f"one prefix went to {replicas}"
            served[tenant] = replicas.pop()
        assert len(set(served.values())) >= 2  # ten prefixes spread over the three replicas (all on one: 3 in 59,049)
        assert hits() - before >= 10 * 2 * 16  # the second and third turn of each tenant reused its prefix's blocks
    with GatewayThread([url for _, url in fleet]) as gateway:
        first_by_name = min(url.split("//")[1] for _, url in fleet)
        assert {ask(gateway.url, tenant, "Hi?").headers["x-lorafleet-replica"] for tenant in tenants} == {first_by_name}  # least loaded, ties by name


def test_an_adapter_prewarmed_on_another_replica_is_routed_there(fleet) -> None:
    names = [url.split("//")[1] for _, url in fleet]
    warm = ring.owners("ad6", names)[-1]  # the replica the ring ranks last for ad6
    loaded = httpx.post(f"http://{warm}/adapters", json={"adapter_id": "ad6", "adapter_source": "local"}, headers=ADMIN, timeout=60)
    assert loaded.status_code == 200 and loaded.json()["tier"] == "device"
    with GatewayThread([url for _, url in fleet]) as gateway:
        wait_until(lambda: {r["name"]: r["hot_adapters"] for r in httpx.get(gateway.url + "/replicas").json()["replicas"]}[warm] > 0,
                   timeout=10, what="the gateway reading the replicas' hot adapters")
        assert {generate(gateway.url, "ad6").headers["x-lorafleet-replica"] for _ in range(3)} == {warm}
        assert 'lorafleet_gateway_routing_total{result="hot"} 3.0' in httpx.get(gateway.url + "/metrics").text


def test_streaming_passes_through_byte_for_byte(fleet) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 12, "adapter_id": "ad2", "details": True}}
    with GatewayThread([url for _, url in fleet]) as gateway:
        with httpx.stream("POST", gateway.url + "/generate_stream", json=body, timeout=60) as response:
            via_gateway = b"".join(response.iter_raw())
            replica = response.headers["x-lorafleet-replica"]
            assert response.headers["content-type"].startswith("text/event-stream")
        direct = httpx.post(f"http://{replica}/generate_stream", json=body, timeout=60).content
    assert via_gateway == direct and via_gateway.count(b"data:") == 12


def test_a_client_that_disconnects_cancels_the_replicas_request(fleet) -> None:
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True, "adapter_id": "ad3"}}
    with GatewayThread([url for _, url in fleet]) as gateway:
        started = time.monotonic()
        whole = httpx.post(gateway.url + "/generate", json=body, timeout=60)
        whole_answer = time.monotonic() - started  # how long the replica takes for all 480 tokens
        with httpx.stream("POST", gateway.url + "/generate_stream", json=body, timeout=60) as response:
            replica = response.headers["x-lorafleet-replica"]
            assert replica == whole.headers["x-lorafleet-replica"]
            next(line for line in response.iter_lines() if line.startswith("data:"))
        # The client hung up after its first token: the replica stops instead of generating the rest.
        took = wait_until(lambda: metric(f"http://{replica}", "lorafleet_requests_in_flight") == 0
                          and metric(f"http://{replica}", "lorafleet_batch_size") == 0, timeout=30, what="the replica idle")
        assert took < whole_answer / 2, f"the replica kept generating for {took:.2f}s (the whole answer takes {whole_answer:.2f}s)"
        wait_until(lambda: {r["name"]: r["in_flight"] for r in httpx.get(gateway.url + "/replicas").json()["replicas"]}[replica] == 0,
                   timeout=5, what="the gateway's in-flight count back to 0")


def test_a_request_without_a_valid_key_is_401(fleet, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("team-secret\n")
    with GatewayThread([url for _, url in fleet], api_key_file=keys) as gateway:
        missing = httpx.post(gateway.url + "/generate", json={"inputs": "Hi"})
        assert missing.status_code == 401 and missing.json()["error_type"] == "unauthorized"
        assert httpx.post(gateway.url + "/generate", json={"inputs": "Hi"}, headers={"authorization": "Bearer wrong"}).status_code == 401
        ok = httpx.post(gateway.url + "/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 2}},
                        headers={"authorization": "Bearer team-secret"}, timeout=60)
        assert ok.status_code == 200


def test_killing_a_replica_mid_run_loses_no_request(fleet, tiny_models, tmp_path: Path) -> None:
    args = fleet[0][0].args
    adapter_root = Path(args[args.index("--adapter-root") + 1])
    victim, victim_url = start_replica("127.0.0.5", tiny_models["llama"], adapter_root, tmp_path / "cache")
    wait_healthy(victim_url, victim)
    urls = [url for _, url in fleet] + [victim_url]
    with GatewayThread(urls) as gateway:
        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=120) as client:
                async def one(i: int) -> httpx.Response:
                    # No adapter: least-loaded routing spreads these over every replica, the victim included.
                    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 120, "ignore_eos_token": True}}
                    return await client.post(gateway.url + "/generate", json=body)

                tasks = [asyncio.create_task(one(i)) for i in range(24)]
                victim_name = victim_url.split("//")[1]
                for _ in range(200):  # kill it only once it is really serving some of them
                    loads = {r["name"]: r["in_flight"] for r in (await client.get(gateway.url + "/replicas")).json()["replicas"]}
                    if loads.get(victim_name, 0) > 0:
                        break
                    await asyncio.sleep(0.02)
                victim.send_signal(signal.SIGKILL)  # dies with requests in flight
                return await asyncio.gather(*tasks)

        responses = asyncio.run(burst())
        assert [r.status_code for r in responses] == [200] * 24
        assert all(r.headers["x-generated-tokens"] == "120" for r in responses)
        assert victim.wait(10) != 0
        assert metric(gateway.url, "lorafleet_gateway_retries_total") >= 1  # requests that were on the killed replica were served by the next owner


def test_a_registered_adapter_answers_by_name_alone_through_the_gateway_and_directly(fleet) -> None:
    urls = [url for _, url in fleet]
    names = [u.split("//")[1] for u in urls]
    owner = ring.owners("ad5", names, 1)[0]
    # A name the ring would place elsewhere than its id: routing by the name would show.
    # (The replicas' ports are random, so any fixed list of names can all land on the owner: CI saw five do so.)
    name = next(n for n in (f"support-bot-{i}" for i in itertools.count()) if ring.owners(n, names, 1)[0] != owner)
    entries = [{"name": name, "id": "ad5", "source": "local"}, {"name": "pirate", "id": "ad4", "source": "local"}]
    for url in urls:  # what the operator does for every Adapter resource
        assert httpx.put(url + "/adapters/catalogue", json={"adapters": entries}, headers=ADMIN).status_code == 200
    by_id = generate(f"http://{owner}", "ad5")
    by_name = httpx.post(f"http://{owner}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4, "adapter_id": name}}, timeout=60)
    assert by_name.status_code == 200 and by_name.json()["generated_text"] == by_id.json()["generated_text"]
    etag = httpx.get(urls[0] + "/adapters/catalogue").headers["etag"]
    assert httpx.get(urls[0] + "/adapters/catalogue", headers={"if-none-match": etag}).status_code == 304
    with GatewayThread(urls, served_model_name="tiny") as gateway:
        wait_until(lambda: len(httpx.get(gateway.url + "/v1/models").json()["data"]) == 3, timeout=10, what="the gateway reading the catalogue")
        models = httpx.get(gateway.url + "/v1/models").json()["data"]
        assert [(m["id"], m["parent"], m["root"]) for m in models] == [("tiny", None, "tiny"), *sorted([("pirate", "tiny", "ad4"), (name, "tiny", "ad5")])]
        for _ in range(3):  # routed by the id the name stands for: the id's ring owner
            response = httpx.post(gateway.url + "/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 4, "temperature": 0},
                                  timeout=60)
            assert response.status_code == 200 and response.headers["x-lorafleet-replica"] == owner
            assert response.json()["choices"][0]["text"] == by_id.json()["generated_text"]
        # counted under the name asked for, at the gateway as at the replica (not under the folder it points at)
        assert metric(gateway.url, f'lorafleet_gateway_adapter_requests_total{{adapter="{name}",placement="owner"}}') == 3
    for url in urls:
        httpx.put(url + "/adapters/catalogue", json={"adapters": []}, headers=ADMIN)


def device_tier(url: str) -> set[str]:
    return {a["id"] for a in httpx.get(url + "/adapters", params={"tier": "device"}, timeout=5).json()}


def names_owned_by(replica: str, names: list[str], prefix: str, *, moving: int, staying: int) -> list[str]:
    """`moving` adapter names whose ring owner is `replica` and `staying` ones owned by another replica, the first found."""
    picked: dict[bool, list[str]] = {True: [], False: []}
    for name in (f"{prefix}{i:02d}" for i in itertools.count()):
        owned = ring.owners(name, names, 1) == [replica]
        if len(picked[owned]) < (moving if owned else staying):
            picked[owned].append(name)
        if len(picked[True]) == moving and len(picked[False]) == staying:
            return picked[True] + picked[False]
    raise AssertionError("unreachable")


def test_a_joining_replica_gets_its_adapters_before_their_traffic_and_a_draining_one_hands_them_on(fleet, fleet_root, tiny_models, tmp_path) -> None:
    urls, adapters_dir = [url for _, url in fleet], fleet_root
    newcomer = "127.0.0.5"
    port = port_on(newcomer)
    new_url = f"http://{newcomer}:{port}"
    # The ring depends on the ports drawn, so names are picked for it: some will move to the newcomer, some stay.
    names = sorted([u.split("//")[1] for u in urls] + [f"{newcomer}:{port}"])
    extra, later = names_owned_by(f"{newcomer}:{port}", names, "hx", moving=4, staying=10), names_owned_by(f"{newcomer}:{port}", names, "hy", moving=3, staying=3)
    for i, name in enumerate(extra + later):
        if not (adapters_dir / name).exists():
            make_lora_adapter(tiny_models["llama"], adapters_dir / name, r=4, seed=100 + i)
    with GatewayThread([*urls, new_url]) as gateway:
        wait_until(lambda: {r["name"]: r["ejected"] for r in httpx.get(gateway.url + "/replicas").json()["replicas"]}[f"{newcomer}:{port}"],
                   timeout=10, what="the absent replica ejected")
        for name in extra:  # hot on the three running replicas
            assert generate(gateway.url, name).status_code == 200
        moving = [n for n in extra if ring.owners(n, names, 1) == [f"{newcomer}:{port}"]]
        time.sleep(1.5)  # a probe round: the gateway has read every replica's device tier

        process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "serve", "--model", str(tiny_models["llama"]), "--host", newcomer,
                                    "--port", str(port), "--adapter-root", str(adapters_dir), "--adapter-source", "local",
                                    "--adapter-cache-dir", str(tmp_path / "cache"), "--max-lora-rank", "16", "--grace-period-s", "20"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=REPLICA_ENV)
        try:
            wait_healthy(new_url, process)
            # Warmed on the newcomer before any request for them was routed there.
            wait_until(lambda: set(moving) <= device_tier(new_url), timeout=20, what="the moved adapters warmed on the newcomer")
            before = adapter_events(new_url)
            for name in moving:
                response = generate(gateway.url, name)
                assert response.status_code == 200 and response.headers["x-adapter-tier"] == "device"  # the replica's own word: it was hot
            after = adapter_events(new_url)
            served_there = after["device_hit"] - before["device_hit"]
            assert served_there >= 1 and {k: after[k] - before[k] for k in ("local_read", "cpu_hit")} == {"local_read": 0, "cpu_hit": 0}

            # Drain: a long request keeps it alive after SIGTERM; meanwhile what only it held is warmed on the next owners.
            for name in later:  # first used now: each is loaded on its owner only
                first_use = generate(gateway.url, name)
                assert first_use.status_code == 200 and first_use.headers["x-adapter-tier"] == "loading"
            only_there = sorted(device_tier(new_url) - set().union(*(device_tier(u) for u in urls)))
            assert only_there
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 480, "ignore_eos_token": True}}
            long_request = subprocess.Popen([sys.executable, "-c", f"import httpx; httpx.post('{new_url}/generate', json={body!r}, timeout=120)"])
            time.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            rest = sorted(u.split("//")[1] for u in urls)
            next_owner = {n: ring.owners(n, rest, 1)[0] for n in only_there}
            wait_until(lambda: all(n in device_tier(f"http://{next_owner[n]}") for n in only_there), timeout=15, what="hand-off before exit")
            assert process.poll() is None, "the drained replica exited before its adapters were handed on"
            long_request.wait(120)
        finally:
            if process.poll() is None:
                process.kill()
            process.wait(30)
