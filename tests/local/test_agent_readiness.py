"""The node agent keeps a pod's Ready condition as a kubelet would from the readinessProbe the operator wrote."""

from __future__ import annotations

from lorafleet.local.readiness import Readiness
from lorafleet.operator.desired import replica_deployment


def replica_readiness() -> Readiness:
    deployment = replica_deployment("m", "ns", {"model": {"id": "org/base"}, "replicas": 2})
    return Readiness.from_container(deployment["spec"]["template"]["spec"]["containers"][0])


def test_a_serving_replica_stays_in_its_service_through_one_slow_health_check() -> None:
    readiness = replica_readiness()
    assert (readiness.period_s, readiness.failure_threshold) == (5.0, 2)  # what the operator asks of a kubelet
    assert readiness.due(0.0) and readiness.record(False, 0.0) is False  # starting: not ready until /health answers
    assert readiness.due(0.5) and readiness.record(True, 0.5) is True  # probed every round until then, ready at once
    assert not readiness.due(3.0) and readiness.due(5.5)  # once ready, once a period
    assert readiness.record(False, 5.5) is True  # one failed probe (a stall while an adapter loads) changes nothing
    assert readiness.record(True, 10.5) is True and readiness.failures == 0  # a success starts the count again
    readiness.record(False, 15.5)
    assert readiness.record(False, 20.5) is False  # failureThreshold failures in a row: out of its Service
    assert readiness.due(21.0)  # and probed every round again, to come back as soon as it answers


def test_an_exited_process_is_not_ready_at_once_and_defaults_are_the_kubelets() -> None:
    readiness = Readiness.from_container({"name": "c"})
    assert (readiness.period_s, readiness.timeout_s, readiness.failure_threshold) == (10.0, 1.0, 3)
    readiness.record(True, 0.0)
    readiness.exited()
    assert not readiness.ready and readiness.due(0.1)
