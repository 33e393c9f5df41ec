"""An adapter update rolled out as a canary on `lorafleet up` (real replicas, gateway, operator) under steady traffic."""

from __future__ import annotations

import json
import threading
from functools import partial

import httpx
import pytest
from support.kube import adapter_status, pods
from support.waiting import wait_until as poll

from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

wait_until = partial(poll, timeout=60.0, interval=0.2)  # predicates here run kubectl: poll gently


class Client:
    """Two callers asking for the adapter by its name in a loop; every answer's status, tier and version recorded."""

    def __init__(self, url: str, name: str) -> None:
        self.url, self.name, self.stop = url, name, threading.Event()
        self.answers: list[tuple[int, str, str]] = []  # (status, x-adapter-tier, x-adapter-id)
        self.replicas: list[str] = []
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(2)]

    def loop(self) -> None:
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                body = {"inputs": "Hello", "parameters": {"adapter_id": self.name, "max_new_tokens": 2}}
                response = client.post(self.url + "/generate", json=body)
                self.answers.append((response.status_code, response.headers.get("x-adapter-tier", ""), response.headers.get("x-adapter-id", "")))
                self.replicas.append(response.headers.get("x-lorafleet-replica", ""))

    def __enter__(self) -> Client:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


def routing_log(workdir) -> list[str]:
    """What the gateway said about its replicas (membership, ejections, retries): why a request left its adapter's owner."""
    lines = [line for path in sorted((workdir / "pods").glob("*.log")) for line in path.read_text(errors="replace").splitlines()]
    return [line for line in lines if "lorafleet.gateway" in line and ("replicas:" in line or "WARNING" in line)][-20:]


def test_a_retrained_adapter_rolls_out_as_a_canary_with_no_failed_or_cold_request(fleet) -> None:
    _, kubectl, url, workdir, adapters, model, _ = fleet
    make_lora_adapter(model, adapters / "pirate-v2", r=4, seed=11)  # the retrained adapter, in a folder of its own
    before = adapter_status(kubectl, "pirate")
    assert before["phase"] == "Ready" and before["serving"]["id"] == "pirate"
    rollout = {"steps": [{"weight": 50, "pause": "3s"}], "analysis": {"minRequests": 5, "interval": "500ms"}}
    with Client(url, "pirate") as client:
        wait_until(lambda: len(client.answers) >= 10, what="steady traffic")
        kubectl("patch", "adapter", "pirate", "--type", "merge", "-p", json.dumps({"spec": {"id": "pirate-v2", "rollout": rollout}}))
        wait_until(lambda: adapter_status(kubectl, "pirate").get("phase") == "Canary", what="the canary taking traffic")
        wait_until(lambda: adapter_status(kubectl, "pirate").get("serving", {}).get("id") == "pirate-v2"
                   and adapter_status(kubectl, "pirate").get("phase") == "Ready", timeout=90, what="promoted")
        promoted = len(client.answers)
        # the gateways read the catalogue each probe round (1 s): within a few, every answer is the new version
        wait_until(lambda: len(client.answers) > promoted + 10 and {v for _, _, v in client.answers[-10:]} == {"pirate-v2"}, timeout=10,
                   interval=0.1, what="the gateways moved to the new version")
    answers = client.answers
    assert {status for status, _, _ in answers} == {200}, [a for a in answers if a[0] != 200][:5]
    cold = [i for i, (_, tier, _) in enumerate(answers) if tier not in ("device", "cpu")]
    if cold:  # pytest -q cuts a long assertion message in the middle: the gateway's own words whole, in the captured output
        print("\n".join(routing_log(workdir)))
    assert not cold, [(i, answers[i], client.replicas[i], answers[i - 3:i], client.replicas[i - 3:i]) for i in cold] + [len(answers)] + routing_log(workdir)
    served = [version for _, _, version in answers]
    assert served.count("pirate-v2") >= 5 and served.count("pirate") >= 5  # both sides served during the canary
    after = adapter_status(kubectl, "pirate")
    assert after["digest"] and after["digest"] != before["digest"] and after["rollout"]["phase"] == "Promoted"
    assert after["rollout"]["canaryRequests"] >= 5 and after["rollout"]["canaryErrors"] == 0

    def old_version_held() -> list[str]:
        held = []
        for name, pod in pods(kubectl).items():
            listing = httpx.get(f"http://{pod['status']['podIP']}:8080/adapters", timeout=10).json()
            held += [name for a in listing if a["id"] == "pirate" and a["tier"] in ("device", "cpu")]
        return held

    wait_until(lambda: not old_version_held(), timeout=30, what="the old version unloaded")

    # A retrained version that loads but answers errors (its logits overflow) is rolled back by the analysis alone.
    make_lora_adapter(model, adapters / "pirate-broken", r=4, seed=12, scale=1e30)
    rollout = {"steps": [{"weight": 30, "pause": "1h"}], "analysis": {"minRequests": 5, "interval": "500ms"}}
    with Client(url, "pirate") as client:
        kubectl("patch", "adapter", "pirate", "--type", "merge", "-p", json.dumps({"spec": {"id": "pirate-broken", "rollout": rollout}}))
        try:
            wait_until(lambda: adapter_status(kubectl, "pirate").get("phase") == "RolledBack", what="the broken canary rolled back")
        except AssertionError:
            raise AssertionError(f"{adapter_status(kubectl, 'pirate')} {client.answers[-20:]}") from None
        rolled_back = len(client.answers)
        wait_until(lambda: len(client.answers) > rolled_back + 10 and {a[:1] + a[2:] for a in client.answers[-10:]} == {(200, "pirate-v2")},
                   timeout=10, interval=0.1, what="every answer from the stable version again")
    status = adapter_status(kubectl, "pirate")
    assert status["reason"] == "ErrorRatio" and status["serving"]["id"] == "pirate-v2", status["message"]
    failed = [a for a in client.answers if a[0] != 200]
    assert failed and {version for _, _, version in failed} <= {"pirate-broken", ""}  # only the canary's share failed
