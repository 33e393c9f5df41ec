"""Demand-driven replication: a hot adapter's owners follow its share of the fleet's requests (pure, then on the API)."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import yaml
from kubernetes import client
from support.operator import BASEMODEL, adapter, custom, run_pod
from support.waiting import wait_until

from lorafleet import ring
from lorafleet.operator.adapter_demand import OwnerHold, owner_counts, request_rates


def test_owners_follow_the_share_of_requests_with_warm_replicas_the_minimum() -> None:
    rates = request_rates({"a": {"hot": 130.0, "": 20.0, "tail": 5.0}, "b": {"hot": 60.0, "tail": 2.0}, "new": {"hot": 999.0}},
                          {"a": {"hot": 10.0, "": 10.0, "tail": 1.0}, "b": {"hot": 80.0}})  # b restarted: its counter went back
    assert rates == {"hot": 120.0 + 0.0, "": 10.0, "tail": 4.0 + 2.0}  # "new" has no earlier read: no rate yet
    names = {"hot": 1, "tail": 1, "wide": 3}
    assert owner_counts(rates, 3, names) == {"hot": 3}  # 120 of 136: ceil(0.88 x 3); tail's share asks for 1
    assert owner_counts({"hot": 60.0, "other": 60.0}, 4, names) == {"hot": 2}  # half of four
    assert owner_counts({"wide": 100.0}, 3, names) == {}  # already on three (warmReplicas)
    assert owner_counts({"hot": 5.0}, 3, names) == {}  # five requests decide nothing
    assert owner_counts({"hot": 100.0}, 1, names) == {}  # one replica: nothing to spread over


def test_extra_owners_are_released_only_after_the_delay() -> None:
    hold = OwnerHold(release_s=30)
    assert hold.update({"hot": 3}, 0) == {"hot": 3}
    assert hold.update({}, 10) == {"hot": 3} and hold.update({"hot": 2}, 29) == {"hot": 3}
    assert hold.update({"hot": 2}, 31) == {"hot": 2}  # lower for 30 s: down to what is wanted
    assert hold.update({}, 45) == {"hot": 2} and hold.update({}, 62) == {}


def metrics(hot: itertools.count) -> str:
    n = next(hot) * 100
    return (f"# TYPE lorafleet_requests_in_flight gauge\nlorafleet_requests_in_flight 2\n"
            f"# TYPE lorafleet_requests counter\nlorafleet_requests_total{{adapter=\"hot\",route=\"/generate\",status=\"200\"}} {n}\n"
            f"lorafleet_requests_total{{adapter=\"\",route=\"/generate\",status=\"200\"}} {n // 10}\n")


@pytest.mark.e2e
def test_a_hot_adapter_is_warmed_on_more_owners_and_gateways_learn_the_count(operator_env) -> None:
    kubectl, api, stubs, _ = operator_env
    core = client.CoreV1Api(api)
    doc = yaml.safe_load(BASEMODEL)
    doc["spec"]["replicas"] = 3
    doc["spec"]["autoscaling"] = {"enabled": True, "minReplicas": 3, "maxReplicas": 3, "interval": "300ms", "scaleDownDelay": "2s",
                                  "targetRequestsPerReplica": 100}
    kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    for pod, stub in stubs.items():
        run_pod(core, "smol", pod, stub)
    kubectl("apply", "-f", "-", input=adapter("hot", "team/hot"))
    wait_until(lambda: (custom(api, "adapters", "hot").get("status") or {}).get("owners") == 1, timeout=20, what="one owner at first")
    counters = {pod: itertools.count() for pod in stubs}
    first = ring.owners("team/hot", sorted(stubs), 1)[0]
    for pod, stub in stubs.items():
        stub.slow["team/hot"] = 0.0 if pod == first else 3.0  # the extra owners take a while to load it
        stub.metrics = lambda c=counters[pod]: metrics(c)  # 100 more requests for hot and 10 for the base model each read
    wait_until(lambda: custom(api, "adapters", "hot")["status"]["owners"] == 3, timeout=20, what="three owners for 91 % of the requests")
    deadline = time.monotonic() + 20
    while not all("team/hot" in stub.loaded for stub in stubs.values()):  # the gateways spread it only over owners that hold it
        assert time.monotonic() < deadline, "not warmed on all three in 20 s"
        spread = [e.get("owners", 1) for stub in stubs.values() for e in stub.catalogue if e["name"] == "hot"]
        assert all(n == 1 for n in spread) or all("team/hot" in stub.loaded for stub in stubs.values()), spread
        time.sleep(0.05)
    wait_until(lambda: all(e.get("owners") == 3 for stub in stubs.values() for e in stub.catalogue if e["name"] == "hot"), timeout=20,
               what="the catalogue tells the gateways")
    for stub in stubs.values():
        stub.metrics = ""  # demand gone
    owner = ring.owners("team/hot", sorted(stubs), 1)[0]
    wait_until(lambda: custom(api, "adapters", "hot")["status"]["owners"] == 1, timeout=20, what="released after scaleDownDelay")
    wait_until(lambda: [p for p, s in stubs.items() if "team/hot" in s.loaded] == [owner], timeout=20, what="unloaded from the extra owners")
    assert json.dumps(custom(api, "adapters", "hot")["status"]["replicas"]) == json.dumps([owner])
