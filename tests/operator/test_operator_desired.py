"""The operator's pure functions: every BaseModel field's effect on the fleet, status, placement, adapter checks."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from lorafleet import ring
from lorafleet.gateway.request_keys import request_payload, routing_key
from lorafleet.operator import adapter_check
from lorafleet.operator.desired import fleet_objects, gateway_deployment, replica_deployment, serve_args
from lorafleet.operator.fleet_status import basemodel_status, placement, ready_pods

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"model": {"id": "org/base", "source": "hub", "dtype": "bfloat16"}, "replicas": 3}


def container(deployment: dict) -> dict:
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_minimal_spec_gives_a_complete_fleet() -> None:
    secret, policy, *objects = fleet_objects("m", "ns", SPEC, "admin-token", "warm-token")
    assert (secret["kind"], secret["metadata"]["name"], base64.b64decode(secret["data"]["token"])) == ("Secret", "m-admin", b"admin-token")
    assert base64.b64decode(secret["data"]["warm-token"]) == b"warm-token"
    assert (policy["kind"], policy["metadata"]["name"]) == ("NetworkPolicy", "m-replicas")
    assert [(o["kind"], o["metadata"]["name"]) for o in objects] == [
        ("ServiceAccount", "m-gateway"), ("Role", "m-gateway"), ("RoleBinding", "m-gateway"), ("Service", "m-replicas"),
        ("Deployment", "m-replicas"), ("PodDisruptionBudget", "m-replicas"), ("Service", "m"), ("Deployment", "m"),
        ("PodDisruptionBudget", "m-gateway")]
    assert objects[7]["spec"]["replicas"] == 2 and objects[8]["spec"]["selector"]["matchLabels"] == objects[7]["spec"]["selector"]["matchLabels"]
    assert all(o["metadata"]["namespace"] == "ns" for o in objects)
    replicas = objects[4]
    assert replicas["spec"]["replicas"] == 3
    assert replicas["spec"]["selector"]["matchLabels"] == objects[3]["spec"]["selector"] == objects[5]["spec"]["selector"]["matchLabels"]
    pod = replicas["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["terminationGracePeriodSeconds"] > 30
    probes = container(replicas)
    assert probes["startupProbe"]["httpGet"]["path"] == "/health" and probes["startupProbe"]["failureThreshold"] * probes["startupProbe"]["periodSeconds"] >= 1800
    assert probes["readinessProbe"]["httpGet"]["path"] == "/health" and "livenessProbe" in probes
    assert objects[1]["rules"] == [{"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                                   {"apiGroups": ["lorafleet.io"], "resources": ["basemodels"], "resourceNames": ["m"], "verbs": ["get", "patch"]}]
    # The replicas take the admin token from the Secret; the gateway never sees it.
    assert {"name": "LORAFLEET_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "m-admin", "key": "token"}}} in container(replicas)["env"]
    # The gateway gets the warm token alone: it warms on hand-offs, and cannot load, pin or unload.
    warm = {"name": "LORAFLEET_WARM_TOKEN", "valueFrom": {"secretKeyRef": {"name": "m-admin", "key": "warm-token"}}}
    assert warm in container(replicas)["env"] and container(objects[7])["env"] == [warm]
    assert '"key": "token"' not in json.dumps(objects[7])


def test_replica_pods_admit_only_the_fleets_gateways_the_operator_and_the_scraper() -> None:
    """Anyone else in the cluster reaching a replica could warm (thrash its slots) or skip the gateway's keys."""
    _, policy, *objects = fleet_objects("m", "ns", SPEC, "admin-token", "warm-token")
    replicas = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "m-replicas")
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "m")
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"] == replicas["spec"]["template"]["metadata"]["labels"] and spec["policyTypes"] == ["Ingress"]
    [rule] = spec["ingress"]
    assert rule["ports"] == [{"port": 8080, "protocol": "TCP"}]
    gateways, operator, scraper = rule["from"]
    assert gateways == {"podSelector": {"matchLabels": gateway["spec"]["template"]["metadata"]["labels"]}}
    operator_pods = yaml.safe_load((ROOT / "manifests" / "operator.yaml").read_text())["spec"]["template"]["metadata"]["labels"]
    assert operator["podSelector"]["matchLabels"].items() <= operator_pods.items() and operator["namespaceSelector"] == {}
    assert scraper["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    custom = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    _, custom_policy, *_ = fleet_objects("m", "ns", {**SPEC, "networkPolicy": {"allowFrom": custom}}, "a", "w")
    assert custom_policy["spec"]["ingress"][0]["from"][2:] == custom
    off = fleet_objects("m", "ns", {**SPEC, "networkPolicy": {"enabled": False}}, "a", "w")
    assert "NetworkPolicy" not in {o["kind"] for o in off}


@pytest.mark.parametrize(
    "field,value,check",
    [
        ("model", {"id": "org/base", "source": "local", "revision": "v2", "dtype": "float16"},
         lambda d: serve_args_of(d)[serve_args_of(d).index("--revision") + 1] == "v2" and "--model-source" in serve_args_of(d) and "float16" in serve_args_of(d)),
        ("image", "registry.local/lorafleet:dev", lambda d: container(d)["image"] == "registry.local/lorafleet:dev"),
        ("resources", {"limits": {"nvidia.com/gpu": 1}}, lambda d: container(d)["resources"] == {"limits": {"nvidia.com/gpu": 1}}),
        ("engine", {"maxActiveAdapters": 32, "maxLoraRank": 16, "maxTotalTokens": 4096, "adapterMemory": "2Gi", "device": "cpu"},
         lambda d: all(x in serve_args_of(d) for x in ["--max-active-adapters", "32", "--max-lora-rank", "16", "--max-total-tokens", "4096", "--adapter-memory", "2Gi", "cpu"])),
        ("cache", {"claimName": "models"}, lambda d: d["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {"claimName": "models"}),
        ("cache", {"sizeLimit": "50Gi"}, lambda d: d["spec"]["template"]["spec"]["volumes"][0]["emptyDir"] == {"sizeLimit": "50Gi"}),
        ("hfTokenSecretRef", {"name": "hf", "key": "tok"},
         lambda d: {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}} in container(d)["env"]),
        ("nodeSelector", {"gpu": "h200"}, lambda d: d["spec"]["template"]["spec"]["nodeSelector"] == {"gpu": "h200"}),
        ("tolerations", [{"key": "gpu", "operator": "Exists"}], lambda d: d["spec"]["template"]["spec"]["tolerations"] == [{"key": "gpu", "operator": "Exists"}]),
        ("affinity", {"podAntiAffinity": {}}, lambda d: d["spec"]["template"]["spec"]["affinity"] == {"podAntiAffinity": {}}),
        ("replicas", 0, lambda d: d["spec"]["replicas"] == 0),
        ("tracing", {"otlpEndpoint": "http://collector:4318"},
         lambda d: serve_args_of(d)[serve_args_of(d).index("--otlp-endpoint") + 1] == "http://collector:4318"
         and {"name": "OTEL_SERVICE_NAME", "value": "m-replica"} in container(d)["env"]),
    ],
)
def test_each_field_reaches_the_replica_deployment(field: str, value, check) -> None:
    deployment = replica_deployment("m", "ns", {**SPEC, field: value})
    assert check(deployment)
    template_changed = deployment["spec"]["template"] != replica_deployment("m", "ns", SPEC)["spec"]["template"]
    assert template_changed == (field != "replicas")  # a spec change rolls out; scaling does not


def serve_args_of(deployment: dict) -> list[str]:
    return container(deployment)["args"]


def test_the_operators_tracing_endpoint_is_a_default_a_basemodel_can_override() -> None:
    from lorafleet.operator.desired import with_tracing_default

    assert with_tracing_default(SPEC, None) is SPEC
    defaulted = with_tracing_default(SPEC, "http://collector:4318")
    assert serve_args(defaulted)[serve_args(defaulted).index("--otlp-endpoint") + 1] == "http://collector:4318"
    own = {**SPEC, "tracing": {"otlpEndpoint": "http://team-collector:4318"}}
    assert with_tracing_default(own, "http://collector:4318") == own


def test_routing_settings_reach_the_gateway() -> None:
    gateway = gateway_deployment("m", "ns", {**SPEC, "routing": {"loadFactor": 1.5, "gatewayReplicas": 2, "apiKeySecretRef": {"name": "keys"}}})
    args = container(gateway)["args"]
    assert args[args.index("--load-factor") + 1] == "1.5" and args[args.index("--service") + 1] == "ns/m-replicas"
    assert args[args.index("--api-key-file") + 1] == "/etc/lorafleet/keys" and gateway["spec"]["replicas"] == 2
    assert gateway["spec"]["template"]["spec"]["serviceAccountName"] == "m-gateway"
    assert serve_args(SPEC)[:3] == ["serve", "--model", "org/base"]
    assert "--otlp-endpoint" not in args and [e["name"] for e in container(gateway)["env"]] == ["LORAFLEET_WARM_TOKEN"]  # no tracing unless asked
    traced = container(gateway_deployment("m", "ns", {**SPEC, "tracing": {"otlpEndpoint": "http://collector:4318"}}))
    assert traced["args"][traced["args"].index("--otlp-endpoint") + 1] == "http://collector:4318"
    assert traced["env"][1:] == [{"name": "OTEL_SERVICE_NAME", "value": "m-gateway"}]


@pytest.mark.parametrize(
    "observed,gateway_ready,phase",
    [
        (None, 0, "Pending"),
        ({"replicas": 3, "readyReplicas": 0, "updatedReplicas": 3}, 1, "Pending"),
        ({"replicas": 4, "readyReplicas": 2, "updatedReplicas": 1}, 1, "Progressing"),
        ({"replicas": 3, "readyReplicas": 2, "updatedReplicas": 3}, 1, "Degraded"),
        ({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}, 1, "Ready"),
        ({"replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}, 0, "Degraded"),
    ],
)
def test_status_is_what_is_observed(observed, gateway_ready: int, phase: str) -> None:
    replicas = None if observed is None else {"status": observed}
    status = basemodel_status("m", "ns", 7, SPEC, replicas, {"status": {"readyReplicas": gateway_ready}}, "2026-01-01T00:00:00Z")
    assert status["phase"] == phase and status["observedGeneration"] == 7
    assert {c["type"]: c["status"] for c in status["conditions"]}["Ready"] == ("True" if phase == "Ready" else "False")
    assert status["selector"] == "app.kubernetes.io/name=lorafleet,app.kubernetes.io/instance=m,app.kubernetes.io/component=replica"


def test_placement_agrees_with_the_gateway_for_the_same_replicas() -> None:
    pods = [{"metadata": {"name": f"m-replicas-{i}"}, "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
             "status": {"podIP": f"10.0.0.{i}", "conditions": [{"type": "Ready", "status": "True"}]}} for i in range(5)]
    pods[2]["status"]["conditions"][0]["status"] = "False"
    members = ready_pods(pods)
    assert sorted(members) == ["m-replicas-0", "m-replicas-1", "m-replicas-3", "m-replicas-4"] and members["m-replicas-0"] == "http://10.0.0.0:8080"
    for i in range(50):
        adapter = f"org/adapter-{i}"
        key = routing_key("/generate", request_payload("/generate", f'{{"inputs": "x", "parameters": {{"adapter_id": "{adapter}"}}}}'.encode()), set())
        idle = {m: 0 for m in members}
        assert placement(adapter, list(members), 1) == [ring.routing_order(key, idle)[0]]
    assert placement("x", list(members), 0) == []


@pytest.mark.parametrize(
    "config,message",
    [
        ({"peft_type": "IA3"}, "peft_type IA3 is not supported; only LORA adapters are served"),
        ({"peft_type": "LORA", "use_dora": True}, "DoRA adapters (use_dora=true) are not supported"),
        ({"peft_type": "LORA", "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "LORA", "r": 8, "rank_pattern": {"q_proj": 128}}, "rank 128 is above the BaseModel's engine.maxLoraRank 64"),
        ({"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "embed_tokens"]}, "LoRA on ['embed_tokens'] is not supported"),
    ],
)
def test_adapters_that_do_not_fit_are_permanent_failures(config: dict, message: str) -> None:
    with pytest.raises(adapter_check.Permanent, match=re.escape(message)):
        adapter_check.check_fits(config, {"maxLoraRank": 64})
    assert adapter_check.check_fits({"r": 16, "target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"]}, {}) == (16, ["q_proj", "v_proj"])
    assert adapter_check.fetch_config("local", "anything", None, None) is None


def test_the_operators_role_may_create_and_patch_every_kind_a_fleet_owns() -> None:
    """A kind added to the fleet (the NetworkPolicy) without its rule would fail every reconcile in a real cluster;
    the embedded API has no RBAC to catch it."""
    from lorafleet.operator.kube import PLURALS

    role = next(o for o in yaml.safe_load_all((ROOT / "manifests" / "rbac.yaml").read_text()) if o and o["kind"] == "ClusterRole")
    allowed = {(group, plural) for rule in role["rules"] if {"create", "patch"} <= set(rule["verbs"])
               for group in rule["apiGroups"] for plural in rule["resources"]}
    for obj in fleet_objects("m", "ns", SPEC, "a", "w"):
        group = obj["apiVersion"].rpartition("/")[0]
        assert (group, PLURALS[obj["kind"]]) in allowed, obj["kind"]


@pytest.mark.parametrize(("source", "adapter_id", "revision", "message"), [
    ("local", "../../../../etc", None, "is a path outside the adapter roots"),
    ("local", "/etc/passwd", None, "is a path outside the adapter roots"),
    ("local", "team/../../etc", None, "is a path outside the adapter roots"),
    ("hub", "org/x", "v" * 1_000_000, "spec.revision must be a branch, tag or commit of at most 255"),
    ("hub", "org/x", "main; rm -rf", "spec.revision must be a branch"),
    ("hub", "x" * 513, None, "spec.id must be 1 to 512 characters"),
    ("hub", "org/x y", None, "without spaces or control characters"),
])
def test_adapter_references_no_replica_would_load_fail_before_any_is_asked(source, adapter_id, revision, message) -> None:  # noqa: ANN001
    with pytest.raises(adapter_check.Permanent, match=re.escape(message)):
        adapter_check.fetch_config(source, adapter_id, revision, None)
    adapter_check.check_reference("local", "team/french.v2", "refs/pr/1")  # nested folders and real revisions pass
