"""The embedded Kubernetes API through the `kubernetes` client: conflicts, patches, selectors, watches, GC."""

from __future__ import annotations

import pytest
from kubernetes import client, config, watch
from kubernetes.client.rest import ApiException

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

GROUP, VERSION, PLURAL = "demo.lorafleet.io", "v1", "widgets"


@pytest.fixture
def api(kube_api):
    api_client = config.new_client_from_config(str(kube_api.kubeconfig))
    yield api_client
    api_client.close()


def widget(name: str, **labels: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": name, "labels": labels}, "spec": {"color": "red"}}


def test_stale_resource_version_is_409_and_failed_patch_test_is_422(api) -> None:
    custom = client.CustomObjectsApi(api)
    created = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("w"))
    assert created["metadata"]["uid"] and created["metadata"]["generation"] == 1 and created["spec"]["replicas"] == 1
    stale = dict(created, spec={"color": "green"})
    custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w", stale)
    with pytest.raises(ApiException) as conflict:
        custom.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w", dict(created, spec={"color": "blue"}))
    assert conflict.value.status == 409
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}, "data": {"a": "1"}})
    with pytest.raises(ApiException) as invalid:
        core.patch_namespaced_config_map("cm", "default", [{"op": "test", "path": "/data/a", "value": "2"}, {"op": "replace", "path": "/data/a", "value": "3"}])
    assert invalid.value.status == 422
    assert core.read_namespaced_config_map("cm", "default").data == {"a": "1"}
    with pytest.raises(ApiException) as exists:
        core.create_namespaced_config_map("default", {"metadata": {"name": "cm"}})
    assert exists.value.status == 409


def test_label_and_field_selectors(api) -> None:
    core = client.CoreV1Api(api)
    for name, team in [("a", "x"), ("b", "y"), ("c", "x")]:
        core.create_namespaced_config_map("default", {"metadata": {"name": name, "labels": {"team": team}}})
    names = lambda items: sorted(i.metadata.name for i in items)  # noqa: E731
    assert names(core.list_namespaced_config_map("default", label_selector="team=x").items) == ["a", "c"]
    assert names(core.list_namespaced_config_map("default", label_selector="team in (y),!missing").items) == ["b"]
    assert names(core.list_namespaced_config_map("default", field_selector="metadata.name=c").items) == ["c"]
    assert names(core.list_namespaced_config_map("default", field_selector="metadata.name!=c", label_selector="team=x").items) == ["a"]


def test_watch_resumes_from_a_resource_version(api) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_config_map("default", {"metadata": {"name": "first"}})
    version = core.list_namespaced_config_map("default").metadata.resource_version
    core.create_namespaced_config_map("default", {"metadata": {"name": "second"}})
    core.patch_namespaced_config_map("second", "default", {"data": {"k": "v"}})
    core.delete_namespaced_config_map("first", "default")
    events = [(e["type"], e["object"].metadata.name) for e in watch.Watch().stream(
        core.list_namespaced_config_map, "default", resource_version=version, timeout_seconds=1)]
    assert events == [("ADDED", "second"), ("MODIFIED", "second"), ("DELETED", "first")]


def test_status_subresource_is_kept_apart_and_generation_follows_spec(api) -> None:
    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("w"))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "w", {"status": {"phase": "Ready"}})
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w")
    assert obj["status"] == {"phase": "Ready"} and obj["metadata"]["generation"] == 1
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w", {"spec": {"color": "gold"}, "status": {"phase": "Hacked"}})
    obj = custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w")
    assert obj["status"] == {"phase": "Ready"} and obj["metadata"]["generation"] == 2
    before = obj["metadata"]["resourceVersion"]
    custom.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w", {"spec": {"color": "gold"}})
    assert custom.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w")["metadata"]["resourceVersion"] == before  # a no-op


def test_owned_objects_are_garbage_collected_with_their_owner(api) -> None:
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    owner = custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("owner"))
    reference = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "name": "owner", "uid": owner["metadata"]["uid"], "controller": True}
    core.create_namespaced_config_map("default", {"metadata": {"name": "owned", "ownerReferences": [reference]}})
    core.create_namespaced_config_map("default", {"metadata": {"name": "free"}})
    custom.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "owner")
    assert [c.metadata.name for c in core.list_namespaced_config_map("default").items] == ["free"]


def test_generate_name_and_missing_namespace(api) -> None:
    core = client.CoreV1Api(api)
    made = core.create_namespaced_event("default", {"metadata": {"generateName": "lorafleet-"}, "involvedObject": {}, "reason": "Test", "message": "m"})
    assert made.metadata.name.startswith("lorafleet-") and len(made.metadata.name) == len("lorafleet-") + 5
    with pytest.raises(ApiException) as missing:
        core.create_namespaced_config_map("nowhere", {"metadata": {"name": "x"}})
    assert missing.value.status == 404


def test_metrics_count_requests_as_a_real_api_server_labels_them(api, kube_api) -> None:
    import httpx

    custom = client.CustomObjectsApi(api)
    custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("m"))
    custom.patch_namespaced_custom_object_status(GROUP, VERSION, "default", PLURAL, "m", {"status": {"phase": "Up"}})
    with pytest.raises(ApiException):
        custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, widget("m"))
    text = httpx.get(f"{kube_api.url}/metrics").text
    assert 'apiserver_request_total{code="201",resource="widgets",subresource="",verb="create"} 1.0' in text
    assert 'apiserver_request_total{code="409",resource="widgets",subresource="",verb="create"} 1.0' in text
    assert 'apiserver_request_total{code="200",resource="widgets",subresource="status",verb="patch"} 1.0' in text
