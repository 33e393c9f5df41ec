"""The embedded Kubernetes API through kubectl: what an operator's user does with it."""

from __future__ import annotations

import json
import time

import pytest
import yaml

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

WIDGET = """
apiVersion: demo.lorafleet.io/v1
kind: Widget
metadata: {name: w1, labels: {team: a}}
spec: {color: red, replicas: 2}
"""


def test_apply_twice_and_get_yaml_with_defaults(kubectl) -> None:
    assert "widget.demo.lorafleet.io/w1 created" in kubectl("apply", "-f", "-", input=WIDGET).stdout
    assert "widget.demo.lorafleet.io/w1 configured" in kubectl("apply", "-f", "-", input=WIDGET.replace("red", "green")).stdout
    assert "unchanged" in kubectl("apply", "-f", "-", input=WIDGET.replace("red", "green")).stdout
    obj = yaml.safe_load(kubectl("get", "widget", "w1", "-o", "yaml").stdout)
    assert obj["spec"] == {"color": "green", "replicas": 2} and obj["metadata"]["generation"] == 2
    kubectl("apply", "-f", "-", input="apiVersion: demo.lorafleet.io/v1\nkind: Widget\nmetadata: {name: w2}\nspec: {}\n")
    assert yaml.safe_load(kubectl("get", "wd", "w2", "-o", "yaml").stdout)["spec"] == {"color": "blue", "replicas": 1}  # schema defaults


def test_printer_columns_and_short_names(kubectl) -> None:
    kubectl("apply", "-f", "-", input=WIDGET)
    lines = kubectl("get", "wd").stdout.splitlines()
    assert lines[0].split() == ["NAME", "COLOR", "REPLICAS", "PHASE", "AGE"]
    assert lines[1].split()[:3] == ["w1", "red", "2"]
    assert "w1" in kubectl("get", "widgets", "-l", "team=a").stdout
    assert "No resources found" in kubectl("get", "widgets", "-l", "team=b").stderr


def test_patch_merge_and_json_replace_and_scale(kubectl) -> None:
    kubectl("apply", "-f", "-", input=WIDGET)
    kubectl("patch", "widget", "w1", "--type", "merge", "-p", '{"spec": {"color": "black"}}')
    kubectl("patch", "widget", "w1", "--type", "json", "-p", '[{"op": "replace", "path": "/spec/replicas", "value": 5}]')
    obj = json.loads(kubectl("get", "widget", "w1", "-o", "json").stdout)
    assert obj["spec"] == {"color": "black", "replicas": 5}
    obj["spec"]["color"] = "white"
    kubectl("replace", "-f", "-", input=json.dumps(obj))
    kubectl("scale", "widget", "w1", "--replicas", "3")
    assert json.loads(kubectl("get", "widget", "w1", "-o", "json").stdout)["spec"] == {"color": "white", "replicas": 3}
    failed = kubectl("patch", "widget", "w1", "--type", "json", "-p", '[{"op": "test", "path": "/spec/replicas", "value": 9}]', check=False)
    assert failed.returncode != 0 and "test" in failed.stderr


def test_get_watch_sees_changes(kubectl) -> None:
    kubectl("apply", "-f", "-", input=WIDGET)
    watcher = kubectl.popen("get", "widgets", "-w", "--request-timeout", "5s")
    try:
        time.sleep(1.0)
        kubectl("patch", "widget", "w1", "--type", "merge", "-p", '{"spec": {"color": "purple"}}')
        time.sleep(1.0)
    finally:
        watcher.terminate()
        output = watcher.communicate(timeout=10)[0]
    assert "red" in output and "purple" in output


def test_delete_waits_for_finalizers_and_wait_for_condition(kubectl, kube_api) -> None:
    kubectl("apply", "-f", "-", input=WIDGET.replace("metadata: {", "metadata: {finalizers: [demo/hold], "))
    deleting = kubectl.popen("delete", "widget", "w1", "--timeout", "20s")
    time.sleep(1.0)
    assert deleting.poll() is None  # held by the finalizer
    assert "deletionTimestamp" in kubectl("get", "widget", "w1", "-o", "yaml").stdout
    kubectl("patch", "widget", "w1", "--type", "merge", "-p", '{"metadata": {"finalizers": null}}')
    assert deleting.wait(20) == 0
    assert kubectl("get", "widget", "w1", check=False).returncode != 0

    kubectl("apply", "-f", "-", input=WIDGET)
    waiting = kubectl.popen("wait", "widget/w1", "--for=condition=Ready", "--timeout=20s")
    time.sleep(0.5)
    kubectl("patch", "widget", "w1", "--subresource", "status", "--type", "merge",
            "-p", '{"status": {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True"}]}}')
    assert waiting.wait(20) == 0, waiting.stdout.read()
    assert "Ready" in kubectl("get", "wd").stdout


def test_server_side_apply_is_refused_with_a_message_and_changes_nothing(kubectl) -> None:
    """Documented as refused: a 415 that says what to do, for an existing object (unchanged) and a new one (not a 404)."""
    kubectl("apply", "-f", "-", input=WIDGET)
    before = kubectl("get", "widget", "w1", "-o", "jsonpath={.spec}").stdout
    existing = kubectl("apply", "--server-side", "-f", "-", input=WIDGET.replace("red", "green"), check=False)
    assert existing.returncode != 0 and "server-side apply is not supported" in existing.stderr
    assert kubectl("get", "widget", "w1", "-o", "jsonpath={.spec}").stdout == before
    new = kubectl("apply", "--server-side", "-f", "-", input=WIDGET.replace("name: w1", "name: w9"), check=False)
    assert new.returncode != 0 and "server-side apply is not supported" in new.stderr and "NotFound" not in new.stderr


def test_namespaces_and_builtin_resources(kubectl) -> None:
    refused = kubectl("create", "namespace", "team-a", check=False)  # protobuf body: refused (a known limit), apply instead
    assert refused.returncode != 0 and "protobuf bodies are not supported" in refused.stderr
    kubectl("apply", "-f", "-", input="apiVersion: v1\nkind: Namespace\nmetadata: {name: team-a}\n")
    assert "team-a" in kubectl("get", "ns").stdout
    kubectl("apply", "-n", "team-a", "-f", "-", input="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {k: v}\n")
    assert "c " in kubectl("get", "cm", "-n", "team-a").stdout + " "
    missing = kubectl("apply", "-n", "nowhere", "-f", "-", input="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n", check=False)
    assert missing.returncode != 0 and 'namespaces "nowhere" not found' in missing.stderr


GADGET_CRD = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: gadgets.demo.lorafleet.io}
spec:
  group: demo.lorafleet.io
  scope: Cluster
  names: {plural: gadgets, singular: gadget, kind: Gadget}
  versions:
    - name: v1
      served: true
      storage: true
      schema: {openAPIV3Schema: {type: object, x-kubernetes-preserve-unknown-fields: true}}
"""


def test_a_crd_applied_after_start_registers_its_resource(kubectl) -> None:
    kubectl("get", "widgets")  # discovery is cached before the new kind exists
    kubectl("apply", "-f", "-", input=GADGET_CRD)
    kubectl("apply", "-f", "-", input="apiVersion: demo.lorafleet.io/v1\nkind: Gadget\nmetadata: {name: g1}\nspec: {x: 1}\n")
    assert "g1" in kubectl("get", "gadgets").stdout
    conditions = json.loads(kubectl("get", "crd", "gadgets.demo.lorafleet.io", "-o", "json").stdout)["status"]["conditions"]
    assert {"type": "Established", "status": "True"}.items() <= conditions[0].items()
    kubectl("delete", "crd", "gadgets.demo.lorafleet.io")
    assert kubectl("get", "gadgets", check=False).returncode != 0


def test_the_api_starts_in_under_a_second() -> None:
    from lorafleet.local.kubeapi import EmbeddedKubeAPI

    started = time.perf_counter()
    with EmbeddedKubeAPI():
        elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"took {elapsed:.2f}s"


def test_lorafleet_kube_api_command_installs_crds_and_writes_a_kubeconfig(tmp_path) -> None:
    import subprocess
    import sys

    import yaml
    from support.kube import WIDGET_CRD, kubectl_for

    (tmp_path / "crds").mkdir()
    (tmp_path / "crds" / "widgets.yaml").write_text(yaml.safe_dump(WIDGET_CRD))
    kubeconfig = tmp_path / "kubeconfig"
    process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "kube-api", "--crds", str(tmp_path / "crds"), "--kubeconfig", str(kubeconfig)],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().startswith("embedded Kubernetes API at http://127.0.0.1:")
        assert process.stdout.readline().strip() == f"export KUBECONFIG={kubeconfig}"
        kubectl = kubectl_for(kubeconfig, tmp_path / "cache")
        kubectl("apply", "-f", "-", input=WIDGET)
        assert "w1" in kubectl("get", "widgets").stdout
    finally:
        process.terminate()
        process.wait(10)
    bad = subprocess.run([sys.executable, "-P", "-m", "lorafleet", "kube-api", "--crds", str(tmp_path / "missing")], capture_output=True, text=True)
    assert bad.returncode == 2 and "is not a folder" in bad.stderr
