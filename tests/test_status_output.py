"""`lorafleet status`'s table, from the objects in the API: every BaseModel, replica pod and Adapter, one line each."""

from __future__ import annotations

from lorafleet.local.up import print_status

OBJECTS = {
    "BaseModel": [{"metadata": {"name": "smollm2"}, "spec": {"replicas": 3},
                   "status": {"phase": "Ready", "readyReplicas": 2, "gateway": "http://127.0.0.1:8080"}}],
    "Pod": [{"metadata": {"name": "smollm2-replicas-abcde"}, "status": {"podIP": "127.0.0.2", "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "smollm2-replicas-fghij"}, "status": {"podIP": "127.0.0.3", "conditions": [{"type": "Ready", "status": "False"}]}}],
    "Adapter": [{"metadata": {"name": "pirate"}, "status": {"phase": "Ready", "hotOn": "smollm2-replicas-abcde"}},
                {"metadata": {"name": "broken"}, "status": {"phase": "Failed"}},
                {"metadata": {"name": "new"}}],
}


class FakeKube:
    def __init__(self) -> None:
        self.asked: list[tuple] = []

    def list(self, api_version: str, kind: str, namespace: str, selector: str | None = None) -> list[dict]:
        self.asked.append((api_version, kind, namespace, selector))
        return OBJECTS[kind]


def test_status_prints_every_object_with_its_state(capsys) -> None:
    kube = FakeKube()
    print_status(kube)
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines == [
        ["BASEMODEL", "PHASE", "READY", "GATEWAY"],
        ["smollm2", "Ready", "2/3", "http://127.0.0.1:8080"],
        ["REPLICA", "POD", "ADDRESS", "READY"],
        ["smollm2-replicas-abcde", "127.0.0.2", "yes"],
        ["smollm2-replicas-fghij", "127.0.0.3", "no"],
        ["ADAPTER", "PHASE", "HOT", "ON"],
        ["pirate", "Ready", "smollm2-replicas-abcde"],
        ["broken", "Failed", "-"],
        ["new", "-", "-"],
    ]
    assert ("v1", "Pod", "default", "app.kubernetes.io/component=replica") in kube.asked  # replica pods only
