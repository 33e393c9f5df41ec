"""The operator's end-to-end fixture: the embedded API, the operator running against it, three stub replicas."""

from __future__ import annotations

import pytest
from support.operator import StubReplica, operator_running


@pytest.fixture
def operator_env(kube_api, kubectl, monkeypatch):
    replicas = {f"smol-replicas-{i}": StubReplica(f"127.0.0.{10 + i}") for i in range(3)}
    try:
        with operator_running(kube_api, kubectl, monkeypatch) as api:
            yield kubectl, api, replicas, None
    finally:
        for replica in replicas.values():
            replica.close()
