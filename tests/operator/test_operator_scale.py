"""The operator driven by events alone: scale-ups, restarts, rest and slow sources, with many Adapters.

The operator's safety net (re-reading every replica's listing) is set to an hour unless a test
says otherwise, so whatever happens here within seconds was caused by a watch event.
"""

from __future__ import annotations

import json
import time

import pytest
import yaml
from kubernetes import client
from support.hub import HubStandIn
from support.operator import StubReplica, operator_running, run_pod, set_pod_ready
from support.waiting import wait_until

from lorafleet import ring

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

BASEMODEL = {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": "smol"},
             "spec": {"model": {"id": "smollm2", "source": "local"}, "replicas": 2, "engine": {"maxLoraRank": 16}}}


def adapters_yaml(names: list[str], source: str = "local", ids: dict[str, str] | None = None) -> str:
    return yaml.safe_dump_all([{"apiVersion": "lorafleet.io/v1alpha1", "kind": "Adapter", "metadata": {"name": name},
                                "spec": {"baseModel": "smol", "id": (ids or {}).get(name, f"team/{name}"), "source": source, "warmReplicas": 1}}
                               for name in names])


def statuses(api: client.ApiClient) -> dict[str, dict]:
    items = client.CustomObjectsApi(api).list_namespaced_custom_object("lorafleet.io", "v1alpha1", "default", "adapters")["items"]
    return {a["metadata"]["name"]: a.get("status") or {} for a in items}


def api_revision(api: client.ApiClient) -> str:
    """The embedded API's global resourceVersion: every write anywhere moves it."""
    return client.CustomObjectsApi(api).list_namespaced_custom_object("lorafleet.io", "v1alpha1", "default", "adapters")["metadata"]["resourceVersion"]


def misplaced(api, replicas: dict[str, StubReplica], names: list[str], members: list[str], only: bool = True) -> list[tuple]:
    """Adapters not Ready on their ring owner among ``members`` (and, with ``only``, held nowhere else)."""
    seen, wrong = statuses(api), []
    for name in names:
        owner = ring.owners(f"team/{name}", members, 1)
        holders = [p for p, r in replicas.items() if f"team/{name}" in r.loaded]
        held = holders == owner if only else owner[0] in holders
        if seen.get(name, {}).get("phase") != "Ready" or seen[name].get("replicas") != owner or not held:
            wrong.append((name, owner, holders, seen.get(name)))
    return wrong


def wait_placed(api, replicas: dict[str, StubReplica], names: list[str], members: list[str], timeout: float = 20, only: bool = True) -> float:
    try:
        return wait_until(lambda: not misplaced(api, replicas, names, members, only), timeout=timeout, interval=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; misplaced (name, owner, holders, status): {misplaced(api, replicas, names, members, only)[:3]}") from None


def placed(fleet, pods: list[str], names: list[str]) -> None:
    """The replica pods Ready and the Adapters ``names`` applied and Ready on their owners."""
    kubectl, api, replicas = fleet
    core = client.CoreV1Api(api)
    for pod in pods:
        run_pod(core, "smol", pod, replicas[pod])
    kubectl("apply", "-f", "-", input=adapters_yaml(names))
    wait_placed(api, replicas, names, pods, timeout=20)


@pytest.fixture
def fleet(kube_api, kubectl, monkeypatch):
    replicas = {f"smol-replicas-{i}": StubReplica(f"127.0.0.{20 + i}") for i in range(3)}
    try:
        with operator_running(kube_api, kubectl, monkeypatch) as api:
            kubectl("apply", "-f", "-", input=json.dumps(BASEMODEL))
            yield kubectl, api, replicas
    finally:
        for replica in replicas.values():
            replica.close()


def test_a_scale_up_re_places_only_the_adapters_that_moved_at_once(fleet) -> None:
    kubectl, api, replicas = fleet
    core = client.CoreV1Api(api)
    first_two, names = sorted(replicas)[:2], [f"a{i:02d}" for i in range(30)]
    placed(fleet, first_two, names)
    for replica in replicas.values():
        replica.calls.clear()
    third = sorted(replicas)[2]
    moved = [n for n in names if ring.owners(f"team/{n}", sorted(replicas), 1) == [third]]
    assert 0 < len(moved) < len(names)

    run_pod(core, "smol", third, replicas[third])
    took = wait_placed(api, replicas, names, sorted(replicas), timeout=20, only=False)
    assert took < 5, f"re-placement took {took:.1f}s"
    # A few seconds later (the gateways have read that the new owner holds them) they leave their old holders.
    wait_placed(api, replicas, names, sorted(replicas), timeout=10)
    # Only the moved adapters were touched: loaded on the new pod, unloaded from where they were.
    assert sorted(a for op, a in replicas[third].calls if op == "load") == sorted(f"team/{n}" for n in moved)
    for pod in first_two:
        assert all(op == "unload" and a in {f"team/{n}" for n in moved} for op, a in replicas[pod].calls)
    assert replicas[third].listings == 1  # one listing for the new pod, not a call per adapter
    # Every replica, the new one too, knows each Adapter by name (so a name alone is a request).
    expected = [{"name": n, "id": f"team/{n}", "source": "local", "revision": None} for n in names]
    wait_until(lambda: all(r.catalogue == expected for r in replicas.values()), timeout=5, what="the catalogue on every replica")


def test_a_replica_back_from_a_restart_gets_its_adapters_again(fleet) -> None:
    kubectl, api, replicas = fleet
    core = client.CoreV1Api(api)
    pods, names = sorted(replicas)[:2], [f"b{i:02d}" for i in range(12)]
    placed(fleet, pods, names)
    victim, survivor = pods[0], pods[1]
    its_own = {f"team/{n}" for n in names if ring.owners(f"team/{n}", pods, 1) == [victim]}
    assert its_own

    # Killed: not Ready, and it comes back empty. Meanwhile the survivor holds everything.
    set_pod_ready(core, victim, False)
    replicas[victim].loaded.clear()
    wait_placed(api, replicas, names, [survivor], timeout=10)
    set_pod_ready(core, victim, True, restarts=1)
    took = wait_placed(api, replicas, names, pods, timeout=10)
    assert set(replicas[victim].loaded) == its_own and took < 5


def test_a_fleet_at_rest_writes_nothing(kube_api, kubectl, monkeypatch) -> None:
    """At rest, with the safety net re-reading listings every half second: not one write while it runs 40 times."""
    replicas = {f"smol-replicas-{i}": StubReplica(f"127.0.0.{30 + i}") for i in range(2)}
    try:
        with operator_running(kube_api, kubectl, monkeypatch, residency_check_s=0.5) as api:
            kubectl("apply", "-f", "-", input=json.dumps(BASEMODEL))
            core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
            for pod, replica in replicas.items():
                run_pod(core, "smol", pod, replica)
            names = [f"c{i:02d}" for i in range(20)]
            kubectl("apply", "-f", "-", input=adapters_yaml(names))
            wait_placed(api, replicas, names, sorted(replicas), timeout=20)
            wait_until(lambda: apps.read_namespaced_deployment("smol", "default"))
            apps.patch_namespaced_deployment_status("smol-replicas", "default", {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}})
            apps.patch_namespaced_deployment_status("smol", "default", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}})
            wait_until(lambda: client.CustomObjectsApi(api).get_namespaced_custom_object(
                "lorafleet.io", "v1alpha1", "default", "basemodels", "smol").get("status", {}).get("phase") == "Ready")
            settled = [api_revision(api), time.monotonic()]

            def quiet_for(seconds: float) -> bool:  # the last writes and their watch events have landed
                revision = api_revision(api)
                if revision != settled[0]:
                    settled[:] = [revision, time.monotonic()]
                return time.monotonic() - settled[1] >= seconds

            wait_until(lambda: quiet_for(2.0), timeout=30, what="the API at rest")
            before, listings, loads = api_revision(api), sum(r.listings for r in replicas.values()), sum(len(r.calls) for r in replicas.values())
            # the safety net runs twice a second per replica: 40 more listings is about ten seconds at rest
            wait_until(lambda: sum(r.listings for r in replicas.values()) - listings >= 40, timeout=60, what="40 listings")
            assert api_revision(api) == before
            assert sum(len(r.calls) for r in replicas.values()) == loads
    finally:
        for replica in replicas.values():
            replica.close()


def test_a_slow_source_for_one_adapter_leaves_the_others_prompt(fleet, tmp_path, monkeypatch) -> None:
    kubectl, api, replicas = fleet
    core = client.CoreV1Api(api)
    pods = sorted(replicas)[:2]
    for pod in pods:
        run_pod(core, "smol", pod, replicas[pod])
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        hub.add_config("acme/slow", tmp_path / "slow", {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj"]})
        hub.repo_delay_s["acme/slow"] = 8  # validating it waits on the hub (under huggingface_hub's 10 s timeout: no retries outlive the test)
        for replica in replicas.values():
            replica.slow["team/slow-load"] = 20  # loading it waits on the replica
        kubectl("apply", "-f", "-", input=adapters_yaml(["slow-hub"], source="hub", ids={"slow-hub": "acme/slow"}))
        kubectl("apply", "-f", "-", input=adapters_yaml(["slow-load"]))
        time.sleep(0.5)  # both slow ones are under way first
        names = [f"d{i:02d}" for i in range(20)]
        start = time.monotonic()
        kubectl("apply", "-f", "-", input=adapters_yaml(names))
        wait_placed(api, replicas, names, pods, timeout=20)
        assert time.monotonic() - start < 5
        seen = statuses(api)
        assert seen.get("slow-hub", {}).get("phase") != "Ready" and seen.get("slow-load", {}).get("phase") != "Ready"
        # The slow one gets there in its own time (and no hub request outlives the hub).
        wait_until(lambda: statuses(api).get("slow-hub", {}).get("phase") == "Ready", timeout=40)


def test_adapters_of_a_deleted_basemodel_fail_with_the_reason_and_can_still_be_deleted(fleet) -> None:
    kubectl, api, replicas = fleet
    core = client.CoreV1Api(api)
    pod = sorted(replicas)[0]
    run_pod(core, "smol", pod, replicas[pod])
    kubectl("apply", "-f", "-", input=adapters_yaml(["e00", "e01"]))
    wait_placed(api, replicas, ["e00", "e01"], [pod])
    kubectl("delete", "basemodel", "smol", "--timeout", "30s")
    wait_until(lambda: all(s.get("reason") == "BaseModelNotFound" for s in statuses(api).values()), timeout=15)
    assert statuses(api)["e00"]["phase"] == "Failed" and "BaseModel 'smol' does not exist" in statuses(api)["e00"]["message"]
    kubectl("delete", "adapter", "e00", "e01", "--timeout", "20s")  # the finalizer does not hold them without a fleet
    assert statuses(api) == {}


def test_spec_pinned_reaches_the_replica_as_a_pinned_load(fleet) -> None:
    """`spec.pinned: true` loads the adapter with pin (the replica never evicts it); others load unpinned."""
    kubectl, api, replicas = fleet
    core = client.CoreV1Api(api)
    pods = ["smol-replicas-0", "smol-replicas-1"]
    for pod in pods:
        run_pod(core, "smol", pod, replicas[pod])
    docs = list(yaml.safe_load_all(adapters_yaml(["keep", "loose"])))
    docs[0]["spec"]["pinned"] = True
    kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    wait_placed(api, replicas, ["keep", "loose"], pods)
    held = {adapter: pinned for replica in replicas.values() for adapter, pinned in replica.loaded.items()}
    assert held == {"team/keep": True, "team/loose": False}
