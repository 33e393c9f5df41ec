"""`lorafleet up` end to end on the tiny model: the embedded API, the operator, the node agent, the gateway."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx
import pytest
from support.kube import adapter_status, pods
from support.metrics import metric_values
from support.waiting import wait_until as poll

from lorafleet import ring
from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

wait_until = partial(poll, timeout=60.0, interval=0.2)  # predicates here run kubectl: poll gently


def last_value(args: list[str], flag: str) -> str:
    """The value a flag ends with (the agent appends the pod's own after the operator's; argparse takes the last)."""
    return args[len(args) - 1 - args[::-1].index(flag) + 1]


def processes() -> list[tuple[int, list[str]]]:
    """(pid, argv) of every lorafleet process on the machine, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "lorafleet" in argv and "--host" in argv:
                found.append((int(entry.name), argv))
    return found


def generate(url: str, adapter: str | None) -> httpx.Response:
    parameters = {"max_new_tokens": 4, **({"adapter_id": adapter, "adapter_source": "local"} if adapter else {})}
    return httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": parameters}, timeout=60)


def test_the_whole_fleet_on_one_machine(fleet) -> None:
    process, kubectl, url, workdir, adapters, model, output = fleet
    assert "export KUBECONFIG=" in output and "BASEMODEL" in output and "pirate" in output
    # 1. The sample adapter is hot on exactly one pod, and a request for it is served there without a load.
    status = adapter_status(kubectl, "pirate")
    assert status["phase"] == "Ready" and len(status["replicas"]) == 1
    owner = status["replicas"][0]
    response = generate(url, "pirate")
    assert response.status_code == 200 and response.headers["x-lorafleet-replica"] == owner
    owner_ip = pods(kubectl)[owner]["status"]["podIP"]
    metrics = httpx.get(f"http://{owner_ip}:8080/metrics").text
    assert 'lorafleet_adapter_events{event="device_hit"}' in metrics and 'event="source_fetch"} 0.0' in metrics
    # The operator warmed it with the fleet's admin token (from the Secret it made); nobody else may.
    assert httpx.get(f"http://{owner_ip}:8080/info").json()["admin_auth"] is True
    assert httpx.post(f"http://{owner_ip}:8080/adapters", json={"adapter_id": "pirate", "pin": True}).status_code == 401
    assert httpx.post(url + "/adapters", json={"adapter_id": "pirate", "pin": True}).status_code == 403

    # An Adapter is named validly after any folder; its name alone is a request, through the gateway.
    bot = json.loads(kubectl("get", "adapter", "support-bot.v2", "-o", "json").stdout)
    assert bot["spec"]["id"] == "Support_Bot.v2" and bot["status"]["phase"] == "Ready"
    by_name = httpx.post(url + "/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4, "adapter_id": "support-bot.v2"}}, timeout=60)
    assert by_name.status_code == 200 and by_name.headers["x-lorafleet-replica"] == bot["status"]["replicas"][0]
    wait_until(lambda: [(m["id"], m["parent"]) for m in httpx.get(url + "/v1/models").json()["data"]]
               == [("smollm2", None), ("pirate", "smollm2"), ("support-bot.v2", "smollm2")], timeout=10, what="/v1/models through the gateway")
    refused = kubectl("apply", "-f", "-", input="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: Support_Bot.v2}\n", check=False)
    assert refused.returncode != 0 and "RFC 1123 subdomain" in refused.stderr

    # 2. An Adapter applied with kubectl goes Ready on its ring owner.
    make_lora_adapter(model, adapters / "shouty", r=4, seed=2)  # a new adapter dropped into the adapter root
    kubectl("apply", "-f", "-", input="apiVersion: lorafleet.io/v1alpha1\nkind: Adapter\nmetadata: {name: shouty}\n"
                                      "spec: {baseModel: smollm2, source: local, id: shouty, warmReplicas: 1}\n")
    wait_until(lambda: adapter_status(kubectl, "shouty").get("phase") == "Ready", what="shouty Ready")
    assert adapter_status(kubectl, "shouty")["replicas"] == ring.owners("shouty", sorted(pods(kubectl)), 1)

    # 3. Scale to three: a third process, and every adapter on its owner among the three.
    kubectl("scale", "basemodel", "smollm2", "--replicas", "3")
    wait_until(lambda: len(pods(kubectl)) == 3 and all(any(c["status"] == "True" for c in p["status"]["conditions"]) for p in pods(kubectl).values()),
               timeout=90, what="three ready replicas")
    for name in ("pirate", "shouty"):
        expected = ring.owners(name, sorted(pods(kubectl)), 1)
        wait_until(lambda n=name, e=expected: adapter_status(kubectl, n).get("replicas") == e, what=f"{name} re-placed")
        # The gateway may still send it to the old replica, which holds it hot too, until its next
        # probe (every second) reads that the new owner has it.
        wait_until(lambda n=name, e=expected: generate(url, n).headers["x-lorafleet-replica"] == e[0], timeout=10,
                   interval=0.5, what=f"{name} routed to its new owner")

    # 4. Kill a replica process mid-traffic: no request lost, and the agent brings it back. The victim is
    # shouty's owner (so step 5 always checks a re-warm), killed once it is seen running shouty's requests.
    victim = adapter_status(kubectl, "shouty")["replicas"][0]
    victim_ip = pods(kubectl)[victim]["status"]["podIP"]
    victim_pid = next(pid for pid, args in processes() if "serve" in args and last_value(args, "--host") == victim_ip)

    async def burst() -> tuple[list[int], float]:
        async with httpx.AsyncClient(timeout=120) as client:
            # Long enough (300 tokens) that the requests are still running when the poll below sees them.
            body = {"inputs": "Hello", "parameters": {"max_new_tokens": 300, "ignore_eos_token": True, "adapter_id": "shouty", "adapter_source": "local"}}
            tasks = [asyncio.create_task(client.post(url + "/generate", json=body)) for _ in range(18)]
            running = 0.0
            for _ in range(1000):  # up to ~20 s: the requests must be in flight on the victim when it dies
                running = metric_values((await client.get(f"http://{victim_ip}:8080/metrics")).text)["vllm:num_requests_running"]
                if running >= 1:
                    break
                await asyncio.sleep(0.02)
            os.kill(victim_pid, signal.SIGKILL)
            return [r.status_code for r in await asyncio.gather(*tasks)], running

    statuses, in_flight = asyncio.run(burst())
    assert in_flight >= 1, "nothing was running on the victim when it was killed"
    assert statuses == [200] * 18  # the victim's in-flight requests were retried elsewhere
    wait_until(lambda: pods(kubectl)[victim]["status"]["containerStatuses"][0]["restartCount"] >= 1
               and httpx.get(f"http://{victim_ip}:8080/health", timeout=2).status_code == 200, timeout=90, what="the victim restarted")

    # 5. A restarted replica lost its adapters: its restart count tells the operator, which warms them again. Then deleting one unloads it.
    # While the victim was down shouty was placed on another replica; back and Ready, it owns shouty again.
    wait_until(lambda: adapter_status(kubectl, "shouty").get("replicas") == [victim], timeout=45, what="shouty placed on the restarted victim")
    owner, owner_ip = victim, victim_ip  # the restarted replica itself, so the re-warm is really checked
    wait_until(lambda: "shouty" in {a["id"] for a in httpx.get(f"http://{owner_ip}:8080/adapters").json()}, timeout=45, what="shouty re-warmed")
    kubectl("delete", "adapter", "shouty", "--timeout", "60s")
    assert "shouty" not in {a["id"] for a in httpx.get(f"http://{owner_ip}:8080/adapters").json()}

    # 6. `lorafleet down` stops everything.
    port = url.rsplit(":", 1)[1]
    children = [str(pid) for pid, argv in processes() if any(str(workdir) in a for a in argv) or ("gateway" in argv and port in argv)]
    assert len(children) >= 4  # three replicas and the gateway
    down = subprocess.run([sys.executable, "-P", "-m", "lorafleet", "down", "--workdir", str(workdir)], capture_output=True, text=True, timeout=90)
    assert down.returncode == 0, down.stderr
    assert process.wait(60) == 0
    time.sleep(0.5)
    still = [pid for pid in children if subprocess.run(["ps", "-p", pid], capture_output=True).returncode == 0]
    assert not still, f"left behind: {still}"
