"""The embedded API's watch history: a watch expires (410) only when it would miss an event of its own kind."""

from __future__ import annotations

import pytest

from lorafleet.local.kubeapi import store as store_module
from lorafleet.local.kubeapi.resources import ResourceDef
from lorafleet.local.kubeapi.store import ApiError, Store

BUSY = ResourceDef("lorafleet.io", "v1alpha1", "adapters", "Adapter", True)
IDLE = ResourceDef("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition", False)


def test_a_flood_of_one_kind_does_not_expire_an_idle_watch_of_another(monkeypatch) -> None:
    monkeypatch.setattr(store_module, "HISTORY", 10)
    store = Store()
    store.create(IDLE, None, {"metadata": {"name": "adapters.lorafleet.io"}})
    start = int(store.get(IDLE, None, "adapters.lorafleet.io")["metadata"]["resourceVersion"])
    for i in range(30):  # three times the history: the oldest adapter events are gone
        store.create(BUSY, "default", {"metadata": {"name": f"a{i}"}})
    assert store.events_since(IDLE, None, start, lambda _: True) == []  # nothing of its kind was missed: no 410
    with pytest.raises(ApiError) as expired:
        store.events_since(BUSY, "default", start, lambda _: True)  # its own kind's events are gone: relist
    assert expired.value.status == 410
    assert len(store.events_since(BUSY, "default", start + 25, lambda _: True)) == 5  # recent enough: served from history
