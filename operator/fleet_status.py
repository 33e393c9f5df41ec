"""Observed objects → a BaseModel's status, and an Adapter + ready replicas → its placement. Pure functions."""

from __future__ import annotations

from typing import Any

from lorafleet import ring
from lorafleet.operator.desired import gateway_url, labels


def condition(kind: str, ok: bool, reason: str, message: str, now: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if ok else "False", "reason": reason, "message": message, "lastTransitionTime": now}


def basemodel_status(name: str, namespace: str, generation: int, spec: dict[str, Any], replicas: dict[str, Any] | None,
                     gateway: dict[str, Any] | None, now: str) -> dict[str, Any]:
    """Status from the replica and gateway Deployments as observed (never as intended)."""
    desired = spec.get("replicas", 1)
    observed = (replicas or {}).get("status") or {}
    ready = observed.get("readyReplicas") or 0
    updated = observed.get("updatedReplicas") or 0
    gateway_ready = ((gateway or {}).get("status") or {}).get("readyReplicas") or 0
    if replicas is None:
        phase, reason, message = "Pending", "Creating", "the replica Deployment does not exist yet"
    elif desired == 0:
        phase, reason, message = "Ready", "ScaledToZero", "no replicas requested"
    elif ready >= desired and updated >= desired and gateway_ready > 0:
        phase, reason, message = "Ready", "AllReplicasReady", f"{ready}/{desired} replicas ready"
    elif ready == 0:
        phase, reason, message = "Pending", "NoReplicaReady", f"0/{desired} replicas ready (models may still be loading)"
    elif updated < desired:
        phase, reason, message = "Progressing", "RollingOut", f"{updated}/{desired} replicas updated, {ready} ready"
    else:
        phase, reason, message = "Degraded", "ReplicasUnavailable", f"{ready}/{desired} replicas ready"
    selector = ",".join(f"{k}={v}" for k, v in labels(name, "replica").items())
    return {
        "phase": phase,
        "replicas": observed.get("replicas") or 0,
        "readyReplicas": ready,
        "selector": selector,
        "observedGeneration": generation,
        "gateway": gateway_url(name, namespace),
        "conditions": [
            condition("Ready", phase == "Ready", reason, message, now),
            condition("Progressing", phase == "Progressing", reason, message, now),
            condition("Degraded", phase == "Degraded", reason, message, now),
        ],
    }


def keep_transition_times(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """``new`` with each condition's lastTransitionTime taken from ``old`` where its status did not flip (API conventions)."""
    before = {c.get("type"): c for c in old.get("conditions") or []}
    conditions = []
    for c in new.get("conditions") or []:
        previous = before.get(c["type"])
        same = previous is not None and previous.get("status") == c["status"] and previous.get("lastTransitionTime")
        conditions.append({**c, "lastTransitionTime": previous["lastTransitionTime"]} if same else c)
    return {**new, "conditions": conditions}


def ready_pods(pods: list[dict[str, Any]]) -> dict[str, str]:
    """``{pod name: base URL}`` of the replica pods that are Ready and have an IP (the gateway's members)."""
    members = {}
    for pod in pods:
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
        if not ready or not status.get("podIP") or (pod.get("metadata") or {}).get("deletionTimestamp"):
            continue
        port = next((p.get("containerPort") for c in pod["spec"].get("containers", []) for p in c.get("ports", []) if p.get("name") == "http"), 8080)
        members[pod["metadata"]["name"]] = f"http://{status['podIP']}:{port}"
    return members


def placement(adapter_id: str, members: list[str], warm_replicas: int) -> list[str]:
    """The replicas that keep an adapter hot: its first owners on the gateway's own ring."""
    return ring.owners(adapter_id, members, warm_replicas) if warm_replicas > 0 else []
