"""The operator (kopf) against the embedded Kubernetes API, driven with kubectl, with stub replicas."""

from __future__ import annotations

import pytest
import yaml
from kubernetes import client
from support.hub import HubStandIn
from support.operator import BASEMODEL, adapter, custom, digest, run_pod, set_pod_ready
from support.waiting import wait_until

from lorafleet import ring

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

def test_basemodel_becomes_a_fleet_with_owner_references(operator_env) -> None:
    kubectl, api, _, runner = operator_env
    kubectl("apply", "-f", "-", input=BASEMODEL)
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    wait_until(lambda: apps.read_namespaced_deployment("smol", "default") is not None)
    owner_uid = custom(api, "basemodels", "smol")["metadata"]["uid"]
    replicas = apps.read_namespaced_deployment("smol-replicas", "default")
    assert replicas.spec.replicas == 2
    args = replicas.spec.template.spec.containers[0].args
    assert args[:3] == ["serve", "--model", "smollm2"] and "--max-lora-rank" in args and args[args.index("--max-lora-rank") + 1] == "16"
    assert args[args.index("--otlp-endpoint") + 1] == "http://otel-collector:4318"  # the operator's default: the BaseModel names none
    objects = [replicas, apps.read_namespaced_deployment("smol", "default"), core.read_namespaced_service("smol", "default"),
               core.read_namespaced_service("smol-replicas", "default"), client.PolicyV1Api(api).read_namespaced_pod_disruption_budget("smol-replicas", "default"),
               core.read_namespaced_service_account("smol-gateway", "default"), client.RbacAuthorizationV1Api(api).read_namespaced_role("smol-gateway", "default")]
    for obj in objects:
        assert [r.uid for r in obj.metadata.owner_references] == [owner_uid], obj.metadata.name
    gateway_args = apps.read_namespaced_deployment("smol", "default").spec.template.spec.containers[0].args
    assert "--service" in gateway_args and gateway_args[gateway_args.index("--service") + 1] == "default/smol-replicas"
    wait_until(lambda: custom(api, "basemodels", "smol").get("status", {}).get("phase") == "Pending")
    # The kubelet and controllers are not here: report the Deployment ready and watch the status follow.
    apps.patch_namespaced_deployment_status("smol-replicas", "default", {"status": {"replicas": 2, "readyReplicas": 2, "updatedReplicas": 2}})
    apps.patch_namespaced_deployment_status("smol", "default", {"status": {"replicas": 1, "readyReplicas": 1, "updatedReplicas": 1}})
    wait_until(lambda: custom(api, "basemodels", "smol")["status"]["phase"] == "Ready")
    status = custom(api, "basemodels", "smol")["status"]
    assert status["readyReplicas"] == 2 and status["gateway"] == "http://smol.default.svc:8000" and status["observedGeneration"] == 1
    lines = kubectl("get", "basemodels").stdout.splitlines()
    assert lines[0].split() == ["NAME", "MODEL", "REPLICAS", "READY", "PHASE", "AGE"] and lines[1].split()[:5] == ["smol", "smollm2", "2", "2", "Ready"]
    kubectl("scale", "basemodel", "smol", "--replicas", "3")
    wait_until(lambda: apps.read_namespaced_deployment("smol-replicas", "default").spec.replicas == 3)
    kubectl("delete", "basemodel", "smol")
    wait_until(lambda: not apps.list_namespaced_deployment("default").items)


def test_adapter_warms_on_its_ring_owner_moves_when_replicas_change_and_unloads_on_delete(operator_env) -> None:
    kubectl, api, replicas, _ = operator_env
    core = client.CoreV1Api(api)
    kubectl("apply", "-f", "-", input=BASEMODEL)
    for pod in list(replicas)[:2]:
        run_pod(core, "smol", pod, replicas[pod])
    kubectl("apply", "-f", "-", input=adapter("pirate", "team/pirate"))
    owner = ring.owners("team/pirate", sorted(list(replicas)[:2]), 1)[0]
    wait_until(lambda: custom(api, "adapters", "pirate").get("status", {}).get("phase") == "Ready")
    status = custom(api, "adapters", "pirate")["status"]
    assert status["replicas"] == [owner] and replicas[owner].loaded == {"team/pirate": False}
    assert "pirate" in kubectl("get", "adapters").stdout and owner in kubectl("get", "adapters").stdout
    # A third replica arrives: the ring may hand the adapter to it; either way it is hot on the new owner only.
    third = list(replicas)[2]
    run_pod(core, "smol", third, replicas[third])
    new_owner = ring.owners("team/pirate", sorted(replicas), 1)[0]
    wait_until(lambda: custom(api, "adapters", "pirate")["status"]["replicas"] == [new_owner])
    wait_until(lambda: [p for p, r in replicas.items() if "team/pirate" in r.loaded] == [new_owner])
    # The owner's container restarts and loses what it had: its restart count tells, and it is warmed again.
    replicas[new_owner].loaded.clear()
    set_pod_ready(core, new_owner, True, restarts=1)
    wait_until(lambda: "team/pirate" in replicas[new_owner].loaded)
    kubectl("delete", "adapter", "pirate", "--timeout", "30s")
    assert ("unload", "team/pirate") in replicas[new_owner].calls and not replicas[new_owner].loaded


def test_adapters_that_cannot_work_end_failed_with_a_reason(operator_env, monkeypatch, tmp_path) -> None:
    kubectl, api, replicas, _ = operator_env
    kubectl("apply", "-f", "-", input=adapter("orphan", "team/x", base="no-such-base"))
    wait_until(lambda: custom(api, "adapters", "orphan").get("status", {}).get("phase") == "Failed")
    assert custom(api, "adapters", "orphan")["status"]["reason"] == "BaseModelNotFound"
    kubectl("apply", "-f", "-", input=BASEMODEL)
    with HubStandIn() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
        hub.add_config("acme/too-big", tmp_path / "big", {"peft_type": "LORA", "r": 64, "target_modules": ["q_proj"]})
        kubectl("apply", "-f", "-", input=adapter("ghost", "acme/missing", source="hub"))
        kubectl("apply", "-f", "-", input=adapter("big", "acme/too-big", source="hub"))
        wait_until(lambda: custom(api, "adapters", "ghost").get("status", {}).get("phase") == "Failed")
        wait_until(lambda: custom(api, "adapters", "big").get("status", {}).get("phase") == "Failed")
    assert "not found" in custom(api, "adapters", "ghost")["status"]["message"]
    assert "rank 64 is above the BaseModel's engine.maxLoraRank 16" in custom(api, "adapters", "big")["status"]["message"]
    run_pod(client.CoreV1Api(api), "smol", "smol-replicas-0", replicas["smol-replicas-0"])
    kubectl("apply", "-f", "-", input=adapter("refused", "refused/adapter"))
    wait_until(lambda: custom(api, "adapters", "refused").get("status", {}).get("phase") == "Failed")
    assert "refused the adapter: not a LoRA for this base" in custom(api, "adapters", "refused")["status"]["message"]


def test_a_revision_pinned_adapter_warms_that_revision_where_the_gateway_routes_it_and_moves_when_it_changes(operator_env) -> None:
    """The gateway routes an Adapter with spec.revision by ``id@revision``: the operator must load that revision (not
    the bare id) on that key's ring owners, count only that version as resident, and on a revision change warm the
    new one before unloading the old one where it was."""
    kubectl, api, replicas, _ = operator_env
    core = client.CoreV1Api(api)
    kubectl("apply", "-f", "-", input=BASEMODEL)
    for pod in replicas:
        run_pod(core, "smol", pod, replicas[pod])
    members = sorted(replicas)
    owner = {key: ring.owners(key, members, 1)[0] for key in ["team/pirate", *(f"team/pirate@v{i}" for i in range(1, 20))]}
    old = next(f"v{i}" for i in range(1, 20) if owner[f"team/pirate@v{i}"] != owner["team/pirate"])  # the bare id lands elsewhere
    new = next(f"v{i}" for i in range(1, 20) if owner[f"team/pirate@v{i}"] != owner[f"team/pirate@{old}"])
    body = yaml.safe_load(adapter("pirate", "team/pirate"))
    body["spec"]["revision"] = old
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
    wait_until(lambda: custom(api, "adapters", "pirate").get("status", {}).get("phase") == "Ready")
    first = owner[f"team/pirate@{old}"]
    assert custom(api, "adapters", "pirate")["status"]["replicas"] == [first]
    assert {p: r.loaded for p, r in replicas.items() if r.loaded} == {first: {f"team/pirate@{old}": False}}
    assert replicas[first].refs[f"team/pirate@{old}"].revision == old  # sent as the load's revision
    assert {"name": "pirate", "id": "team/pirate", "source": "local", "revision": old} in replicas[first].catalogue
    assert custom(api, "adapters", "pirate")["status"]["digest"] == digest(f"team/pirate@{old}")  # what the replica serves
    kubectl("patch", "adapter", "pirate", "--type", "merge", "-p", f'{{"spec": {{"revision": "{new}"}}}}')
    second = owner[f"team/pirate@{new}"]
    wait_until(lambda: custom(api, "adapters", "pirate")["status"]["replicas"] == [second])
    wait_until(lambda: {p: list(r.loaded) for p, r in replicas.items() if r.loaded} == {second: [f"team/pirate@{new}"]})
    wait_until(lambda: custom(api, "adapters", "pirate")["status"].get("digest") == digest(f"team/pirate@{new}"), what="the new digest in status")
    # the old version left only once the new one was hot: no request for the name found neither
    assert replicas[second].answered[("load", f"team/pirate@{new}")] < replicas[first].answered[("unload", f"team/pirate@{old}")]


def test_an_update_moves_the_name_only_once_the_new_version_is_hot_and_a_broken_one_never_takes_it(operator_env) -> None:
    """The catalogue (what the gateways and replicas resolve the name by) keeps the old version while the new one
    warms: no request for the name meets a replica that must load the new version cold. A new version a replica
    refuses never takes the name; status says Rolling, then Failed with the version that still serves."""
    kubectl, api, replicas, _ = operator_env
    core = client.CoreV1Api(api)
    kubectl("apply", "-f", "-", input=BASEMODEL)
    for pod in replicas:
        run_pod(core, "smol", pod, replicas[pod])
    body = yaml.safe_load(adapter("pirate", "team/pirate"))
    body["spec"]["revision"] = "v1"
    kubectl("apply", "-f", "-", input=yaml.safe_dump(body))
    wait_until(lambda: custom(api, "adapters", "pirate").get("status", {}).get("phase") == "Ready")

    def catalogued() -> set:
        return {e["revision"] for r in replicas.values() for e in r.catalogue if e["name"] == "pirate"}

    assert catalogued() == {"v1"}
    for replica in replicas.values():
        replica.slow["team/pirate@v2"] = 3.0
    kubectl("patch", "adapter", "pirate", "--type", "merge", "-p", '{"spec": {"revision": "v2"}}')
    wait_until(lambda: custom(api, "adapters", "pirate")["status"]["phase"] == "Rolling", what="Rolling")
    status = custom(api, "adapters", "pirate")["status"]
    assert "v1 serves until then" in status["message"] and status["serving"]["revision"] == "v1"
    assert catalogued() == {"v1"}  # the new version is loading: the name still goes to v1
    wait_until(lambda: catalogued() == {"v2"}, timeout=15, what="the name moved to v2")
    assert any("team/pirate@v2" in r.loaded for r in replicas.values())  # ...which was hot first
    wait_until(lambda: custom(api, "adapters", "pirate")["status"]["phase"] == "Ready")

    kubectl("patch", "adapter", "pirate", "--type", "merge", "-p", '{"spec": {"id": "refused/pirate", "revision": "v3"}}')
    wait_until(lambda: custom(api, "adapters", "pirate")["status"]["phase"] == "Failed", what="the broken version Failed")
    status = custom(api, "adapters", "pirate")["status"]
    assert "team/pirate@v2 still serves" in status["message"] and catalogued() == {"v2"}
