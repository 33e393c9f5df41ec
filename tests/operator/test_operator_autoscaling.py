"""Autoscaling through the operator on the embedded API: replicas' signals in, spec.replicas out; zero and back."""

from __future__ import annotations

import asyncio
import datetime
import json

import pytest
import yaml
from kubernetes import client
from support.operator import BASEMODEL, custom, run_pod
from support.waiting import wait_until

from lorafleet.gateway.demand import DemandStamp

pytestmark = pytest.mark.e2e


def busy(in_flight: int, served: int) -> str:
    return (f"# TYPE lorafleet_requests_in_flight gauge\nlorafleet_requests_in_flight {in_flight}\n"
            f"# TYPE lorafleet_queue_size gauge\nlorafleet_queue_size 0\n"
            f"# TYPE lorafleet_kv_cache_usage_ratio gauge\nlorafleet_kv_cache_usage_ratio 0.1\n"
            f"# TYPE lorafleet_adapter_slots gauge\nlorafleet_adapter_slots 8\n"
            f'# TYPE lorafleet_requests counter\nlorafleet_requests_total{{adapter="",route="/generate",status="200"}} {served}\n')


def autoscaled(**settings) -> str:
    doc = yaml.safe_load(BASEMODEL)
    doc["spec"]["autoscaling"] = {"enabled": True, "interval": "300ms", **settings}
    return yaml.safe_dump(doc)


def replicas(api) -> int:
    return custom(api, "basemodels", "smol")["spec"]["replicas"]


def test_an_idle_fleet_goes_to_zero_a_demand_stamp_brings_one_back_and_load_grows_it(operator_env) -> None:
    kubectl, api, stubs, _ = operator_env
    core = client.CoreV1Api(api)
    kubectl("apply", "-f", "-", input=autoscaled(minReplicas=0, maxReplicas=3, idleToZero="1s", scaleDownDelay="1s", targetRequestsPerReplica=8))
    names = list(stubs)
    run_pod(core, "smol", names[0], stubs[names[0]])
    stubs[names[0]].metrics = busy(0, 0)
    wait_until(lambda: replicas(api) == 0, timeout=20, what="scaled to zero after idleToZero")
    status = custom(api, "basemodels", "smol")["status"]["autoscaling"]
    assert status["desiredReplicas"] == 0 and "no request for 1 s" in status["reason"]
    events = json.loads(kubectl("get", "events", "-o", "json").stdout)["items"]
    assert any(e.get("reason") == "Scaled" and e.get("message", "").startswith("2 -> 0 replicas") for e in events)
    # The gateway stamps demand when a request finds no ready replica (its own code, through the API): one replica at once.
    asyncio.run(DemandStamp("default/smol").stamp())
    assert custom(api, "basemodels", "smol")["metadata"]["annotations"]["lorafleet.io/demand-at"].startswith(str(datetime.date.today().year))
    wait_until(lambda: replicas(api) == 1, timeout=5, what="one replica for the demand")
    # Load: 20 in flight on the one replica at a target of 8 wants 3 (the max).
    stubs[names[0]].metrics = busy(20, 50)
    wait_until(lambda: replicas(api) == 3, timeout=10, what="grown to three for 20 requests in flight")
    assert "20 requests in flight or queued" in custom(api, "basemodels", "smol")["status"]["autoscaling"]["reason"]
    gateway = next(o for o in [yaml.safe_load(kubectl("get", "deployment", "smol", "-o", "yaml").stdout)])
    args = gateway["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--hold-at-zero-s") + 1] == "120.0" and args[args.index("--demand-basemodel") + 1] == "default/smol"


def test_autoscaling_bounds_are_validated_by_the_schema(operator_env) -> None:
    kubectl, *_ = operator_env
    refused = kubectl("apply", "-f", "-", input=autoscaled(minReplicas=-1), check=False)
    assert refused.returncode != 0 and "minReplicas" in refused.stderr
    refused = kubectl("apply", "-f", "-", input=autoscaled(scaleDownDelay="five minutes"), check=False)
    assert refused.returncode != 0 and "scaleDownDelay" in refused.stderr
