"""The Helm chart (charts/lorafleet), rendered and linted by Helm's own engine: it installs what kustomize
installs, validates against Kubernetes 1.32, and its values schema turns typos into install errors."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml
from support.helm import CHART, notes, render

from lorafleet import __version__
from lorafleet.cli import build_parser
from lorafleet.operator.desired import IMAGE

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.32.0"
EXAMPLE = yaml.safe_load((CHART / "examples" / "mistral-7b-one-gpu.yaml").read_text())
SERVICE_MONITOR_API = "monitoring.coreos.com/v1/ServiceMonitor"
HELM_ONLY_LABELS = ("app.kubernetes.io/managed-by", "app.kubernetes.io/version", "helm.sh/chart", "app.kubernetes.io/instance")


def kustomize(folder: str) -> list[dict]:
    rendered = subprocess.run(["kubectl", "kustomize", str(ROOT / folder)], capture_output=True, text=True, check=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(rendered) if doc]


def without_release_labels(node):  # noqa: ANN001, ANN201
    """The object with the labels only a Helm release has (and the release's instance label) removed."""
    if isinstance(node, dict):
        return {k: without_release_labels(v) for k, v in node.items() if k not in HELM_ONLY_LABELS}
    if isinstance(node, list):
        return [without_release_labels(item) for item in node]
    return node


def by_kind(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(o["kind"], o["metadata"]["name"]): o for o in objects}


def operator_container(objects: list[dict]) -> dict:
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    return deployment["spec"]["template"]["spec"]["containers"][0]


def test_the_default_release_installs_exactly_what_kustomize_installs() -> None:
    """Apart from the Namespace (helm's --create-namespace), the release's own labels and the Grafana dashboard's
    ConfigMap (kustomize users import monitoring/dashboard.json themselves), object for object."""
    chart = {key: obj for key, obj in by_kind(without_release_labels(render())).items() if key != ("ConfigMap", "lorafleet-dashboard")}
    kustomized = {key: obj for key, obj in by_kind(kustomize("manifests")).items() if key[0] not in ("Namespace", "CustomResourceDefinition")}
    assert sorted(chart) == sorted(kustomized)
    for key, obj in kustomized.items():
        assert chart[key] == obj, key


def test_the_chart_ships_the_crds_the_operator_serves() -> None:
    with helm_python.Chart.load(CHART) as chart:
        crds = {Path(c["filename"]).name: yaml.safe_load(c["data"]) for c in chart.crds}
        assert chart.metadata["appVersion"] == __version__
    assert crds == {name: yaml.safe_load((ROOT / "crds" / name).read_text()) for name in ("basemodels.yaml", "adapters.yaml", "tenants.yaml")}
    assert operator_container(render())["image"] == IMAGE


def test_it_lints_clean_against_kubernetes_1_32() -> None:
    for values in ({}, EXAMPLE):
        report = helm_python.lint(CHART, values, strict=True, kube_version=f"v{K8S_VERSION}")
        assert report["errors"] == [] and [m for m in report["messages"] if m["severity"] >= 2] == [], report


@pytest.mark.parametrize("values", [
    {},
    EXAMPLE,
    {"operator": {"watchNamespaces": ["team-a", "team-b"], "env": [{"name": "HF_ENDPOINT", "value": "http://mirror"}],
                  "nodeSelector": {"pool": "system"}, "tolerations": [{"key": "x", "operator": "Exists"}],
                  "podAnnotations": {"a": "b"}, "residencyCheckSeconds": 60, "replicaConcurrency": 8},
     "image": {"digest": "sha256:" + "a" * 64, "pullSecrets": [{"name": "registry"}]}, "metrics": {"serviceMonitor": {"enabled": True}}},
], ids=["defaults", "mistral-7b-example", "every-knob"])
def test_every_object_validates_and_the_operator_parses_its_arguments(values: dict) -> None:
    objects = render(values, namespace="lorafleet" if values is EXAMPLE else "lorafleet-system")
    for obj in objects:
        if obj["apiVersion"].startswith(("lorafleet.io/", "monitoring.coreos.com/")):
            continue  # not Kubernetes' own: CRs are checked against our CRDs by the schema test and the embedded API below
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    build_parser().parse_args(operator_container(objects)["args"])


def test_watched_namespaces_get_roles_and_nothing_more_than_the_cluster_wide_install() -> None:
    objects = render({"operator": {"watchNamespaces": ["team-a", "team-b"]}})
    full_rules = next(o for o in kustomize("manifests") if o["kind"] == "ClusterRole")["rules"]
    cluster_rules = next(o for o in objects if o["kind"] == "ClusterRole")["rules"]
    roles = {o["metadata"]["namespace"]: o["rules"] for o in objects if o["kind"] == "Role"}
    bindings = {o["metadata"]["namespace"]: o for o in objects if o["kind"] == "RoleBinding"}
    assert sorted(roles) == sorted(bindings) == ["team-a", "team-b"]
    assert {r["resources"][0] for r in cluster_rules} == {"customresourcedefinitions", "namespaces"}
    for namespace, rules in roles.items():
        assert rules + cluster_rules == full_rules  # split, not widened
        assert bindings[namespace]["subjects"] == [{"kind": "ServiceAccount", "name": "lorafleet-operator", "namespace": "lorafleet-system"}]
    args = operator_container(objects)["args"]
    assert args[:5] == ["operator", "--namespace", "team-a", "--namespace", "team-b"] and "--all-namespaces" not in args
    parsed = build_parser().parse_args(args)
    assert parsed.namespace == ["team-a", "team-b"]


@pytest.mark.parametrize(("enabled", "api_versions", "expected"), [
    ("auto", [], False), ("auto", [SERVICE_MONITOR_API], True), (True, [], True), (False, [SERVICE_MONITOR_API], False),
])
def test_a_service_monitor_scrapes_the_fleets_when_prometheus_operator_is_there(enabled, api_versions, expected) -> None:  # noqa: ANN001
    objects = render({"metrics": {"serviceMonitor": {"enabled": enabled, "interval": "15s"}}}, api_versions=api_versions)
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert len(monitors) == int(expected)
    if expected:
        spec = monitors[0]["spec"]
        keep_replicas = {"sourceLabels": ["__meta_kubernetes_service_label_app_kubernetes_io_component"], "regex": "replica", "action": "keep"}
        assert spec["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s", "relabelings": [keep_replicas]},
                                     {"port": "metrics", "path": "/metrics", "interval": "15s"}]  # the gateways' own port
        assert spec["selector"]["matchLabels"] == {"app.kubernetes.io/name": "lorafleet"}
        assert spec["selector"]["matchExpressions"][0]["values"] == ["replica", "gateway"]
        assert spec["namespaceSelector"] == {"any": True}
    watched = render({"operator": {"watchNamespaces": ["team-a"]}, "metrics": {"serviceMonitor": {"enabled": True}}})
    assert next(o for o in watched if o["kind"] == "ServiceMonitor")["spec"]["namespaceSelector"] == {"matchNames": ["team-a"]}


def test_the_example_fleet_applies_to_the_api_server(kubectl, tmp_path) -> None:
    """The BaseModel and Adapters the chart renders are accepted next to the CRDs it ships, with the defaults filled."""
    kubectl("apply", "-f", str(CHART / "crds"))
    kubectl("apply", "-f", "-", input="apiVersion: v1\nkind: Namespace\nmetadata: {name: lorafleet}\n")
    fleet = [o for o in render(EXAMPLE, namespace="lorafleet") if o["apiVersion"].startswith("lorafleet.io/")]
    (tmp_path / "fleet.yaml").write_text(yaml.safe_dump_all(fleet))
    kubectl("apply", "-f", str(tmp_path / "fleet.yaml"))
    base = yaml.safe_load(kubectl("-n", "lorafleet", "get", "basemodel", "mistral-7b", "-o", "yaml").stdout)
    assert base["spec"]["image"] == IMAGE and base["spec"]["engine"]["maxLoraRank"] == 16
    adapters = yaml.safe_load(kubectl("-n", "lorafleet", "get", "adapters", "-o", "yaml").stdout)["items"]
    assert {a["metadata"]["name"]: (a["spec"]["baseModel"], a["spec"]["id"]) for a in adapters} == {
        "gsm8k": ("mistral-7b", "predibase/gsm8k"), "customer-support": ("mistral-7b", "predibase/customer_support"),
        "conllpp": ("mistral-7b", "predibase/conllpp")}


@pytest.mark.parametrize(("values", "complaint"), [
    ({"operator": {"resource": {}}}, "at '/operator': additional properties 'resource' not allowed"),
    ({"baseModel": {"create": True, "name": "x", "spec": {"model": {"id": "org/m"}, "replcas": 2}}}, "additional properties 'replcas' not allowed"),
    ({"baseModel": {"create": True, "name": "x", "spec": {"model": {"id": "org/m"}, "engine": {"maxLoraRank": 1024}}}}, "maxLoraRank"),
    ({"baseModel": {"create": True, "name": "x", "spec": {"model": {"id": "org/m"}, "routing": {"loadFactor": 1.0}}}}, "loadFactor"),
    ({"adapters": [{"name": "a", "spec": {"id": "org/a", "source": "ftp"}}]}, "/adapters/0/spec/source"),
    ({"adapters": [{"name": "Bad_Name", "spec": {"id": "org/a"}}]}, "/adapters/0/name"),
    ({"image": {"tag": 5}}, "at '/image/tag': got number, want string"),
    ({"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
    ({"operator": {"watchNamespaces": ["Team A"]}}, "/operator/watchNamespaces/0"),
])
def test_a_typo_in_values_fails_the_install(values: dict, complaint: str) -> None:
    with pytest.raises(helm_python.HelmValuesError, match=None) as caught:
        render(values)
    assert complaint in str(caught.value)


def test_the_values_schema_follows_the_crds() -> None:
    """charts/values_schema.py writes baseModel.spec and adapters[].spec from crds/; a CRD change without it fails here."""
    result = subprocess.run([sys.executable, "-P", str(ROOT / "charts" / "values_schema.py"), "--check"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with helm_python.Chart.load(CHART) as chart:
        chart.validate_schema(EXAMPLE)
        chart.validate_schema(chart.values)


def test_a_fleet_in_a_namespace_the_operator_does_not_watch_is_refused() -> None:
    values = copy.deepcopy(EXAMPLE)
    with pytest.raises(helm_python.HelmRenderError, match=r'release namespace "elsewhere", which operator.watchNamespaces \[lorafleet\] leaves unwatched'):
        render(values, namespace="elsewhere")
    assert "kubectl -n lorafleet get basemodel mistral-7b" in notes(values, namespace="lorafleet")


def test_a_tracing_endpoint_reaches_the_operator_and_through_it_every_fleet() -> None:
    args = operator_container(render({"tracing": {"otlpEndpoint": "http://otel-collector.observability:4318"}}))["args"]
    assert args[args.index("--otlp-endpoint") + 1] == "http://otel-collector.observability:4318"
    assert build_parser().parse_args(args).otlp_endpoint == "http://otel-collector.observability:4318"
    assert "--otlp-endpoint" not in operator_container(render())["args"]
    with pytest.raises(helm_python.HelmValuesError, match="/tracing/otlpEndpoint"):
        render({"tracing": {"otlpEndpoint": "collector:4318"}})


def test_the_operator_gets_its_token_and_extra_env_and_a_pinned_image() -> None:
    objects = render({"operator": {"hfTokenSecretRef": {"name": "hf"}, "env": [{"name": "HF_ENDPOINT", "value": "http://mirror"}]},
                      "image": {"digest": "sha256:" + "b" * 64}})
    container = operator_container(objects)
    assert container["env"] == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
                                {"name": "HF_ENDPOINT", "value": "http://mirror"}]
    assert container["image"] == "ghcr.io/lorafleet/lorafleet@sha256:" + "b" * 64
    assert "env" not in operator_container(render())


def test_two_releases_do_not_share_names_or_select_each_others_pods() -> None:
    first, second = render(name="lorafleet"), render(name="team-b", namespace="team-b")
    assert {o["metadata"]["name"] for o in second} == {"team-b-lorafleet-operator", "team-b-lorafleet-dashboard"}
    selector = next(o for o in second if o["kind"] == "Deployment")["spec"]["selector"]["matchLabels"]
    assert selector["app.kubernetes.io/instance"] == "team-b" and not {o["metadata"]["name"] for o in first} & {o["metadata"]["name"] for o in second}
