"""Canary rollouts against the embedded API with stub replicas: the split in the catalogue, the analysis, promote, abort.

The stub replicas report per-version counters the test scripts (a real replica counts its requests: see
tests/api/test_canary_variant.py); the operator reads them, judges each step, and moves the catalogue.
"""

from __future__ import annotations

import threading
import time

import pytest
import yaml
from kubernetes import client
from support.hub import HubStandIn
from support.operator import BASEMODEL, adapter, custom, run_pod
from support.waiting import wait_until

from lorafleet.traffic_split import VersionCounts

pytestmark = pytest.mark.e2e  # the embedded API and the operator in this process


def canary_adapter(name: str, rollout: dict) -> str:
    body = yaml.safe_load(adapter(name, f"team/{name}"))
    body["spec"].update(revision="v1", rollout=rollout)
    return yaml.safe_dump(body)


def entry(replicas: dict, name: str) -> dict | None:
    """The name's catalogue entry as the replicas hold it (None until they agree)."""
    seen = [next((e for e in r.catalogue if e["name"] == name), None) for r in replicas.values()]
    return seen[0] if all(s == seen[0] for s in seen) else None


class Traffic:
    """Plays the replicas' counters: every 50 ms each version gets requests (and errors, and first tokens) at a rate."""

    def __init__(self, replicas: dict, rates: dict[str, tuple[int, int, float]]) -> None:
        self.replicas, self.rates, self.stop = replicas, rates, threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        while not self.stop.wait(0.05):
            for replica in self.replicas.values():
                for version, (requests, errors, ttft_s) in self.rates.items():
                    counts = replica.counts.setdefault(version, VersionCounts())
                    counts = VersionCounts(counts.requests + requests, counts.errors + errors, list(counts.ttft))
                    for _ in range(requests - errors):
                        counts.observe_ttft(ttft_s)
                    replica.counts[version] = counts

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


def start_fleet(kubectl, api, replicas) -> None:
    core = client.CoreV1Api(api)
    kubectl("apply", "-f", "-", input=BASEMODEL)
    for pod in replicas:
        run_pod(core, "smol", pod, replicas[pod])


def phase(api, name: str) -> str | None:
    return custom(api, "adapters", name).get("status", {}).get("phase")


def test_a_canary_that_answers_errors_is_rolled_back_with_the_numbers(operator_env) -> None:
    kubectl, api, replicas, _ = operator_env
    start_fleet(kubectl, api, replicas)
    rollout = {"steps": [{"weight": 20, "pause": "1h"}], "analysis": {"minRequests": 10, "interval": "200ms", "maxErrorRatio": 0.05}}
    kubectl("apply", "-f", "-", input=canary_adapter("fr", rollout))
    wait_until(lambda: phase(api, "fr") == "Ready", what="v1 Ready")
    assert "canary" not in entry(replicas, "fr")
    kubectl("patch", "adapter", "fr", "--type", "merge", "-p", '{"spec": {"revision": "v2"}}')
    wait_until(lambda: (entry(replicas, "fr") or {}).get("canary", {}).get("weight") == 20, timeout=15, what="the canary at 20 % in the catalogue")
    assert entry(replicas, "fr")["revision"] == "v1" and entry(replicas, "fr")["canary"]["revision"] == "v2"
    assert any("team/fr@v2" in r.loaded for r in replicas.values())  # hot before it took a request
    wait_until(lambda: phase(api, "fr") == "Canary", what="status Canary")
    started = time.monotonic()
    with Traffic(replicas, {"team/fr@v1": (8, 0, 0.05), "team/fr@v2": (2, 1, 0.05)}):
        wait_until(lambda: phase(api, "fr") == "RolledBack", timeout=15, what="the rollback")
    took = time.monotonic() - started
    status = custom(api, "adapters", "fr")["status"]
    assert status["reason"] == "ErrorRatio" and "canary error ratio 0.500" in status["message"] and "rolled back to team/fr@v1" in status["message"]
    assert status["conditions"][0]["reason"] == "ErrorRatio" and status["conditions"][0]["status"] == "False"
    assert status["serving"]["revision"] == "v1" and status["rollout"]["phase"] == "RolledBack" and status["rollout"]["canaryErrors"] > 0
    assert took < 5, f"rolled back {took:.1f}s after the errors began (analysis interval 0.2 s)"
    wait_until(lambda: entry(replicas, "fr") == {"name": "fr", "id": "team/fr", "source": "local", "revision": "v1"}, what="the canary out of the catalogue")
    wait_until(lambda: not any("team/fr@v2" in r.loaded for r in replicas.values()), timeout=15, what="the canary unloaded")
    events = client.CoreV1Api(api).list_namespaced_event("default").items
    assert any(e.reason == "ErrorRatio" and e.type == "Warning" and "0.500" in e.message for e in events)


def test_healthy_steps_promote_themselves_and_the_old_version_leaves(operator_env) -> None:
    kubectl, api, replicas, _ = operator_env
    start_fleet(kubectl, api, replicas)
    rollout = {"steps": [{"weight": 10, "pause": "1s"}, {"weight": 50, "pause": "1s"}], "analysis": {"minRequests": 5, "interval": "200ms"}}
    kubectl("apply", "-f", "-", input=canary_adapter("de", rollout))
    wait_until(lambda: phase(api, "de") == "Ready", what="v1 Ready")
    weights = []

    def watch() -> bool:
        weight = ((entry(replicas, "de") or {}).get("canary") or {}).get("weight")
        if weight is not None and weight not in weights:
            weights.append(weight)
        return (entry(replicas, "de") or {}).get("revision") == "v2"

    with Traffic(replicas, {"team/de@v1": (5, 0, 0.05), "team/de@v2": (5, 0, 0.05)}):
        kubectl("patch", "adapter", "de", "--type", "merge", "-p", '{"spec": {"revision": "v2"}}')
        wait_until(watch, timeout=20, interval=0.02, what="the name moved to v2")
    assert weights == [10, 50] and "canary" not in entry(replicas, "de")
    wait_until(lambda: phase(api, "de") == "Ready", what="Ready on v2")
    assert custom(api, "adapters", "de")["status"]["rollout"]["phase"] == "Promoted"
    wait_until(lambda: not any("team/de@v1" in r.loaded for r in replicas.values()), timeout=15, what="v1 unloaded")


def test_kubectl_promotes_or_aborts_a_rollout_by_annotation(operator_env) -> None:
    kubectl, api, replicas, _ = operator_env
    start_fleet(kubectl, api, replicas)
    kubectl("apply", "-f", "-", input=canary_adapter("es", {"steps": [{"weight": 5, "pause": "1h"}], "analysis": {"interval": "200ms"}}))
    wait_until(lambda: phase(api, "es") == "Ready", what="v1 Ready")
    kubectl("patch", "adapter", "es", "--type", "merge", "-p", '{"spec": {"revision": "v2"}}')
    wait_until(lambda: phase(api, "es") == "Canary", what="Canary")
    kubectl("annotate", "adapter", "es", "lorafleet.io/rollout-action=promote")
    wait_until(lambda: (entry(replicas, "es") or {}).get("revision") == "v2" and "canary" not in entry(replicas, "es"), what="promoted")
    wait_until(lambda: "lorafleet.io/rollout-action" not in (custom(api, "adapters", "es")["metadata"].get("annotations") or {}),
               what="the annotation removed once acted on")

    kubectl("patch", "adapter", "es", "--type", "merge", "-p", '{"spec": {"revision": "v3"}}')
    wait_until(lambda: phase(api, "es") == "Canary", what="Canary for v3")
    kubectl("annotate", "adapter", "es", "lorafleet.io/rollout-action=abort")
    wait_until(lambda: phase(api, "es") == "RolledBack", what="aborted")
    status = custom(api, "adapters", "es")["status"]
    assert status["reason"] == "Aborted" and status["serving"]["revision"] == "v2"
    wait_until(lambda: entry(replicas, "es") == {"name": "es", "id": "team/es", "source": "local", "revision": "v2"}, what="v2 alone in the catalogue")
    table = kubectl("get", "adapters", "-o", "wide").stdout
    assert "CANARY" in table and "team/es@v3" in table


def test_a_moving_hub_revision_is_resolved_to_one_commit_that_every_replica_loads(operator_env, tmp_path, monkeypatch) -> None:
    """``revision: main`` names a branch: the operator resolves it once and every owner loads that commit, so two
    replicas never serve two contents under one version; the branch moving on changes nothing until the spec does."""
    kubectl, api, replicas, _ = operator_env
    first, moved, tagged = "a" * 40, "b" * 40, "c" * 40
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        hub.add_config("team/it", tmp_path / "it", {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]})
        hub.commits.update({("team/it", "main"): first, ("team/it", "v2"): tagged})
        start_fleet(kubectl, api, replicas)
        body = yaml.safe_load(adapter("it", "team/it", source="hub", warm=2))
        body["spec"]["revision"] = "main"
        kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
        wait_until(lambda: phase(api, "it") == "Ready", what="Ready on main's commit")
        status = custom(api, "adapters", "it")["status"]
        assert status["resolvedRevision"] == first and status["serving"]["revision"] == first
        loaded = {ref.revision for r in replicas.values() for ref in r.refs.values() if ref.id == "team/it"}
        assert loaded == {first} and sum("team/it@" + first in r.loaded for r in replicas.values()) == 2
        assert entry(replicas, "it")["revision"] == first  # the name resolves to the commit everywhere
        hub.commits[("team/it", "main")] = moved  # someone pushes to main: the version being served does not change
        kubectl("patch", "adapter", "it", "--type", "merge", "-p", '{"spec": {"warmReplicas": 1}}')
        wait_until(lambda: custom(api, "adapters", "it")["status"].get("observedGeneration") == 2, what="the new generation observed")
        assert custom(api, "adapters", "it")["status"]["resolvedRevision"] == first
        kubectl("patch", "adapter", "it", "--type", "merge", "-p", '{"spec": {"revision": "v2"}}')
        wait_until(lambda: (entry(replicas, "it") or {}).get("revision") == tagged, timeout=15, what="the tag's commit serving")
        wait_until(lambda: custom(api, "adapters", "it")["status"].get("resolvedRevision") == tagged and phase(api, "it") == "Ready")
    assert not any(ref.revision in ("main", "v2") for r in replicas.values() for ref in r.refs.values())


def test_the_old_version_leaves_only_after_every_replica_holds_the_catalogue_without_it(operator_env) -> None:
    """The gateways learn where a name goes from the replicas' catalogue: a version unloaded before a replica held the
    promoted catalogue met that replica's last requests for it and loaded again, cold (the rollout e2e test's rare
    'loading' answer). One replica takes 4 s to hold each catalogue; the old version stays until it holds v2's."""
    kubectl, api, replicas, _ = operator_env
    start_fleet(kubectl, api, replicas)
    rollout = {"steps": [{"weight": 50, "pause": "1s"}], "analysis": {"minRequests": 5, "interval": "200ms"}}
    kubectl("apply", "-f", "-", input=canary_adapter("it", rollout))
    wait_until(lambda: phase(api, "it") == "Ready", what="v1 Ready")
    slow = next(iter(replicas.values()))
    slow.catalogue_delay = 4.0
    with Traffic(replicas, {"team/it@v1": (5, 0, 0.05), "team/it@v2": (5, 0, 0.05)}):
        kubectl("patch", "adapter", "it", "--type", "merge", "-p", '{"spec": {"revision": "v2"}}')
        wait_until(lambda: custom(api, "adapters", "it").get("status", {}).get("rollout", {}).get("phase") == "Promoted", timeout=30,
                   what="promoted")
    wait_until(lambda: not any("team/it@v1" in r.loaded for r in replicas.values()), timeout=40, what="v1 unloaded")
    v2 = {"name": "it", "id": "team/it", "source": "local", "revision": "v2"}
    wait_until(lambda: any(v2 in sent for _, sent in slow.catalogues), timeout=20, what="the slow replica holding v2's catalogue")
    held_v2 = min(at for at, sent in slow.catalogues if v2 in sent)
    unloads = [r.answered[("unload", "team/it@v1")] for r in replicas.values() if ("unload", "team/it@v1") in r.answered]
    assert unloads and min(unloads) >= held_v2, (min(unloads) - held_v2)
