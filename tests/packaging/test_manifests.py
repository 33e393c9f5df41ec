"""The install (kustomize), the samples, and every object the operator makes validate against Kubernetes' schemas."""

from __future__ import annotations

import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from lorafleet.operator.desired import fleet_objects

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"


def kustomize(folder: str) -> list[dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / folder)], capture_output=True, text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def test_install_renders_and_validates() -> None:
    objects = kustomize("manifests")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == [("ClusterRole", "lorafleet-operator"), ("ClusterRoleBinding", "lorafleet-operator"),
                     ("CustomResourceDefinition", "adapters.lorafleet.io"), ("CustomResourceDefinition", "basemodels.lorafleet.io"),
                     ("CustomResourceDefinition", "tenants.lorafleet.io"),
                     ("Deployment", "lorafleet-operator"), ("Namespace", "lorafleet-system"), ("NetworkPolicy", "lorafleet-operator"),
                     ("ServiceAccount", "lorafleet-operator")]
    for obj in objects:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    operator = next(o for o in objects if o["kind"] == "Deployment")
    assert operator["spec"]["strategy"] == {"type": "Recreate"} and operator["metadata"]["namespace"] == "lorafleet-system"


@pytest.mark.parametrize("spec", [
    {"model": {"id": "org/base"}},
    {"model": {"id": "org/base", "source": "hub", "revision": "main"}, "replicas": 4, "resources": {"limits": {"nvidia.com/gpu": 1}},
     "engine": {"maxActiveAdapters": 32}, "cache": {"claimName": "models"}, "hfTokenSecretRef": {"name": "hf"},
     "nodeSelector": {"gpu": "h200"}, "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
     "routing": {"apiKeySecretRef": {"name": "keys"}}, "tracing": {"otlpEndpoint": "http://collector:4318"}},
], ids=["minimal", "everything"])
def test_every_object_the_operator_makes_validates(spec: dict) -> None:
    for obj in fleet_objects("fleet", "default", spec, "admin-token", "warm-token"):
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_samples_apply_to_the_embedded_api(kubectl) -> None:
    kubectl("apply", "-k", str(ROOT / "crds"))
    assert "basemodel.lorafleet.io/smollm2 created" in kubectl("apply", "-k", str(ROOT / "manifests/samples")).stdout
    adapters = yaml.safe_load(kubectl("get", "adapters", "-o", "yaml").stdout)["items"]
    assert sorted(a["metadata"]["name"] for a in adapters) == ["french", "pirate", "shouty"]
    assert next(a for a in adapters if a["metadata"]["name"] == "pirate")["spec"]["pinned"] is False  # schema default
