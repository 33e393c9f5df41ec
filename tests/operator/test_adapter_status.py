"""An Adapter's status as the operator writes it: only on change, transition times only on a flip."""

from __future__ import annotations

from lorafleet.operator.adapter_status import AdapterRecord, next_status, observed
from lorafleet.operator.fleet_status import keep_transition_times

RECORD = AdapterRecord.from_body({"metadata": {"name": "pirate", "namespace": "default", "uid": "u1", "generation": 2},
                                  "spec": {"baseModel": "smol", "id": "team/pirate", "source": "local", "warmReplicas": 2}})


def test_the_same_observation_twice_writes_once() -> None:
    seen = observed(RECORD, ["r-0", "r-1"], ["r-0", "r-1"], [], 8, ["q_proj"])
    first = next_status({}, seen, "2026-01-01T00:00:00Z")
    assert first["phase"] == "Ready" and first["replicas"] == ["r-0", "r-1"] and first["hotOn"] == "r-0,r-1"
    assert first["conditions"] == [{"type": "Ready", "status": "True", "reason": "Resident", "message": "hot on r-0, r-1",
                                    "observedGeneration": 2, "lastTransitionTime": "2026-01-01T00:00:00Z"}]
    assert next_status(first, seen, "2026-01-01T00:05:00Z") is None


def test_a_transition_time_moves_only_when_the_condition_flips() -> None:
    ready = next_status({}, observed(RECORD, ["r-0", "r-1"], ["r-0", "r-1"], [], 8, []), "T1")
    moved = next_status(ready, observed(RECORD, ["r-0", "r-2"], ["r-0", "r-2"], [], 8, []), "T2")
    assert moved["replicas"] == ["r-0", "r-2"] and moved["conditions"][0]["lastTransitionTime"] == "T1"  # reworded, still Ready
    degraded = next_status(moved, observed(RECORD, ["r-0", "r-2"], ["r-0"], ["r-2: HTTP 503: busy"], 8, []), "T3")
    assert degraded["phase"] == "Degraded" and degraded["message"] == "r-2: HTTP 503: busy"
    assert degraded["conditions"][0] == {"type": "Ready", "status": "False", "reason": "PartlyResident", "message": "r-2: HTTP 503: busy",
                                         "observedGeneration": 2, "lastTransitionTime": "T3"}


def test_fields_no_longer_reported_are_removed() -> None:
    ready = next_status({}, observed(RECORD, ["r-0"], ["r-0"], [], 8, ["q_proj"]), "T1")
    failed = next_status(ready, observed(RECORD, [], [], [], None, [], failure=("LoadFailed", "r-0 refused the adapter: bad")), "T2")
    assert failed["rank"] is None and failed["targetModules"] is None  # null deletes them in a merge patch
    assert (failed["phase"], failed["reason"], failed["conditions"][0]["lastTransitionTime"]) == ("Failed", "LoadFailed", "T2")
    written = {k: v for k, v in failed.items() if v is not None}
    assert next_status(written, observed(RECORD, [], [], [], None, [], failure=("LoadFailed", "r-0 refused the adapter: bad")), "T3") is None


def test_basemodel_conditions_keep_their_transition_times_unless_they_flip() -> None:
    old = {"phase": "Ready", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": "T1"},
                                            {"type": "Degraded", "status": "False", "lastTransitionTime": "T1"}]}
    new = {"phase": "Degraded", "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": "T2"},
                                               {"type": "Degraded", "status": "True", "lastTransitionTime": "T2"}]}
    assert keep_transition_times(new, new) == new
    kept = keep_transition_times({**old, "conditions": [{**c, "lastTransitionTime": "T9"} for c in old["conditions"]]}, old)
    assert kept == old
    assert [c["lastTransitionTime"] for c in keep_transition_times(new, old)["conditions"]] == ["T2", "T2"]
