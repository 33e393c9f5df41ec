"""A minimal kopf operator against the embedded API: its handlers fire and its status patches land."""

from __future__ import annotations

import kopf
import pytest
from kopf.testing import KopfRunner
from kubernetes import client, config
from support.waiting import wait_until

pytestmark = pytest.mark.e2e  # starts processes, servers or external binaries

GROUP, VERSION, PLURAL = "demo.lorafleet.io", "v1", "widgets"


def make_registry(url: str, seen: list[str]) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**_):  # the kubeconfig of the API under test, never the user's own
        return kopf.ConnectionInfo(server=url, scheme="Bearer", token="lorafleet-local", default_namespace="default")

    @kopf.on.create(GROUP, VERSION, PLURAL, registry=registry)
    def created(spec, name, patch, **_):
        seen.append(f"create {name} {spec['color']}")
        patch.status["phase"] = "Created"

    @kopf.on.update(GROUP, VERSION, PLURAL, field="spec.color", registry=registry)
    def recolored(old, new, name, **_):
        seen.append(f"update {name} {old}->{new}")

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry)
    def deleted(name, **_):
        seen.append(f"delete {name}")

    @kopf.timer(GROUP, VERSION, PLURAL, interval=0.3, registry=registry)
    def tick(name, status, patch, **_):
        patch.status["ticks"] = (status.get("ticks") or 0) + 1

    return registry


def test_kopf_handlers_fire_and_status_patches_land(kube_api) -> None:
    seen: list[str] = []
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    api = client.CustomObjectsApi(config.new_client_from_config(str(kube_api.kubeconfig)))
    get = lambda: api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w")  # noqa: E731
    with KopfRunner(["run", "--standalone", "--namespace", "default", "--verbose"], registry=make_registry(kube_api.url, seen), settings=settings) as runner:
        api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                            {"apiVersion": f"{GROUP}/{VERSION}", "kind": "Widget", "metadata": {"name": "w"}, "spec": {"color": "red"}})
        wait_until(lambda: "create w red" in seen and (get().get("status") or {}).get("phase") == "Created", timeout=20)
        assert "kopf.zalando.org/KopfFinalizerMarker" in get()["metadata"]["finalizers"]
        api.patch_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w", {"spec": {"color": "green"}})
        wait_until(lambda: "update w red->green" in seen, timeout=20)
        wait_until(lambda: (get().get("status") or {}).get("ticks", 0) >= 2, timeout=20)
        api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "w")
        wait_until(lambda: "delete w" in seen, timeout=20)
        wait_until(lambda: not api.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"], timeout=20)
    assert runner.exit_code == 0, runner.output
    # KopfRunner runs kopf in a thread, which kopf always warns about; anything else is a real problem.
    problems = [line for line in runner.output.splitlines()
                if ("ERROR" in line or "WARNING" in line) and "OS signals are ignored: running not in the main thread" not in line]
    assert not problems, "\n".join(problems)
