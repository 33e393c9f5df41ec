"""The kopf handlers. Each is a few lines around the pure functions in desired.py, fleet_status.py
and adapter_check.py; everything the operator needs lives in the objects, so a restart mid-way
re-derives the same state and creates no duplicates.
"""

from __future__ import annotations

import base64
import datetime
import secrets
from typing import Any

import httpx
import kopf

from lorafleet.operator import adapter_check
from lorafleet.operator.desired import ADMIN_TOKEN_KEY, admin_secret_name, fleet_objects, labels, replica_name
from lorafleet.operator.fleet_status import basemodel_status, placement, ready_pods
from lorafleet.operator.kube import Kube, login

GROUP, VERSION = "lorafleet.io", "v1alpha1"
FINALIZER = "lorafleet.io/operator"
WARM_TIMEOUT_S = 120.0


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register(registry: kopf.OperatorRegistry, kube_factory: Any = Kube, repair_interval: float = 15.0, status_interval: float = 5.0) -> kopf.OperatorRegistry:
    """Attach the handlers to ``registry`` (the global one for ``lorafleet operator``, a fresh one in tests)."""

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.watching.server_timeout = 300  # a stalled watch is reopened by the server...
        settings.watching.client_timeout = 330  # ...or, failing that, by the client
        settings.posting.level = 20  # Events for every decision at INFO and above

    kopf.on.login(registry=registry)(login)

    # -- BaseModel ------------------------------------------------------------------------------

    @kopf.on.create(GROUP, VERSION, "basemodels", registry=registry)
    @kopf.on.update(GROUP, VERSION, "basemodels", field="spec", registry=registry)
    @kopf.on.resume(GROUP, VERSION, "basemodels", registry=registry)
    def reconcile_basemodel(body: kopf.Body, spec: kopf.Spec, name: str, namespace: str, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        kube = kube_factory()
        changed = []
        for obj in fleet_objects(name, namespace, dict(spec), admin_token(kube, namespace, name) or secrets.token_urlsafe(32)):
            kopf.adopt(obj, owner=body)
            outcome, _ = kube.apply(obj)
            if outcome != "unchanged":
                changed.append(f"{obj['kind']}/{obj['metadata']['name']} {outcome}")
        if changed:
            kopf.info(body, reason="Reconciled", message="; ".join(changed))
        patch.status.update(observe_basemodel(kube, name, namespace, meta.get("generation", 1), dict(spec)))

    @kopf.timer(GROUP, VERSION, "basemodels", interval=status_interval, registry=registry)
    def refresh_basemodel(name: str, namespace: str, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
        observed = observe_basemodel(kube_factory(), name, namespace, meta.get("generation", 1), dict(spec))
        if _without_times(observed) != _without_times(dict(status)):
            patch.status.update(observed)

    # -- Adapter --------------------------------------------------------------------------------

    @kopf.on.create(GROUP, VERSION, "adapters", registry=registry)
    @kopf.on.update(GROUP, VERSION, "adapters", field="spec", registry=registry)
    @kopf.on.resume(GROUP, VERSION, "adapters", registry=registry)
    def reconcile_adapter(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, meta: kopf.Meta,
                          patch: kopf.Patch, retry: int, **_: Any) -> None:
        kube = kube_factory()
        generation = meta.get("generation", 1)
        base = kube.get(f"{GROUP}/{VERSION}", "BaseModel", namespace, spec["baseModel"])
        if base is None:
            fail(body, patch, generation, "BaseModelNotFound", f"BaseModel {spec['baseModel']!r} does not exist in {namespace}")
        patch.status.update(phase="Validating", observedGeneration=generation)
        try:
            config = adapter_check.fetch_config(spec.get("source", "hub"), spec["id"], spec.get("revision"), None)
            rank, targets = adapter_check.check_fits(config, base["spec"].get("engine") or {}) if config is not None else (None, [])
        except adapter_check.Permanent as exc:
            fail(body, patch, generation, "Invalid", str(exc))
        except adapter_check.Transient as exc:
            patch.status.update(phase="Pending", message=str(exc))
            raise kopf.TemporaryError(str(exc), delay=min(300, 5 * 2**retry)) from exc
        patch.status.update(rank=rank, targetModules=targets)
        warm(kube, body, spec, status, name, namespace, patch, generation)

    @kopf.timer(GROUP, VERSION, "adapters", interval=repair_interval, registry=registry)
    def repair_adapter(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, meta: kopf.Meta, patch: kopf.Patch, **_: Any) -> None:
        """Re-place and re-warm: replicas come and go, and a restarted replica has lost its adapters."""
        if status.get("phase") in ("Ready", "Warming", "Degraded"):
            warm(kube_factory(), body, spec, status, name, namespace, patch, meta.get("generation", 1))

    @kopf.on.delete(GROUP, VERSION, "adapters", registry=registry)
    def unload_adapter(spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, **_: Any) -> None:
        kube = kube_factory()
        members = fleet_members(kube, namespace, spec["baseModel"])
        headers = admin_headers(kube, namespace, spec["baseModel"])
        for pod in status.get("replicas") or []:
            if pod in members:
                try:  # best effort: the replica may already be gone
                    httpx.delete(f"{members[pod]}/adapters/{spec['id']}", headers=headers, timeout=5.0)
                except httpx.HTTPError:
                    pass

    return registry


def fail(body: kopf.Body, patch: kopf.Patch, generation: int, reason: str, message: str) -> None:
    """Failed with the reason; no retries until the spec changes (a new generation)."""
    patch.status.update(phase="Failed", reason=reason, message=message, observedGeneration=generation,
                        conditions=[{"type": "Ready", "status": "False", "reason": reason, "message": message, "lastTransitionTime": now()}])
    kopf.warn(body, reason=reason, message=message)
    raise kopf.PermanentError(message)


def admin_token(kube: Kube, namespace: str, base: str) -> str | None:
    """The fleet's admin token from its Secret (None before the BaseModel first reconciled)."""
    secret = kube.get("v1", "Secret", namespace, admin_secret_name(base))
    encoded = ((secret or {}).get("data") or {}).get(ADMIN_TOKEN_KEY)
    return base64.b64decode(encoded).decode() if encoded else None


def admin_headers(kube: Kube, namespace: str, base: str) -> dict[str, str]:
    token = admin_token(kube, namespace, base)
    return {"authorization": f"Bearer {token}"} if token else {}


def fleet_members(kube: Kube, namespace: str, base: str) -> dict[str, str]:
    selector = ",".join(f"{k}={v}" for k, v in labels(base, "replica").items())
    return ready_pods(kube.list("v1", "Pod", namespace, selector))


def warm(kube: Kube, body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, patch: kopf.Patch, generation: int) -> None:
    """Load the adapter on its owners (pinned if asked), unload it where it is no longer owned, report what is hot."""
    members = fleet_members(kube, namespace, spec["baseModel"])
    owners = placement(spec["id"], sorted(members), spec.get("warmReplicas", 1))
    request = {"adapter_id": spec["id"], "adapter_source": spec.get("source", "hub"), "pin": bool(spec.get("pinned"))}
    headers = admin_headers(kube, namespace, spec["baseModel"])
    hot, problems = [], []
    for pod in owners:
        try:
            response = httpx.post(f"{members[pod]}/adapters", json=request, headers=headers, timeout=WARM_TIMEOUT_S)
        except httpx.HTTPError as exc:
            problems.append(f"{pod}: {type(exc).__name__}")
            continue
        if response.status_code == 200:
            hot.append(pod)
        elif response.status_code in (404, 422, 424):
            fail(body, patch, generation, "LoadFailed", f"{pod} refused the adapter: {response.json().get('error', response.text)}")
        else:
            problems.append(f"{pod}: HTTP {response.status_code}")
    for pod in set(status.get("replicas") or []) - set(owners):
        if pod in members:
            try:
                httpx.delete(f"{members[pod]}/adapters/{spec['id']}", headers=headers, timeout=5.0)
            except httpx.HTTPError:
                pass
    if not owners:
        phase, message = ("Ready", "lazy: loaded on first request") if spec.get("warmReplicas", 1) == 0 else ("Warming", "no replica is ready yet")
    elif len(hot) == len(owners):
        phase, message = "Ready", f"hot on {', '.join(hot)}"
    else:
        phase, message = ("Degraded" if hot else "Warming"), "; ".join(problems) or "warming"
    if hot != (status.get("replicas") or []) or phase != status.get("phase"):
        kopf.info(body, reason=phase, message=message)
    patch.status.update(phase=phase, message=message, replicas=hot, hotOn=",".join(hot), observedGeneration=generation,
                        conditions=[{"type": "Ready", "status": "True" if phase == "Ready" else "False", "reason": phase, "message": message,
                                     "lastTransitionTime": now()}])
    if phase in ("Warming", "Degraded") and owners:
        raise kopf.TemporaryError(message, delay=10)


def observe_basemodel(kube: Kube, name: str, namespace: str, generation: int, spec: dict) -> dict:
    replicas = kube.get("apps/v1", "Deployment", namespace, replica_name(name))
    gateway = kube.get("apps/v1", "Deployment", namespace, name)
    return basemodel_status(name, namespace, generation, spec, replicas, gateway, now())


def _without_times(status: dict) -> dict:
    copy = dict(status)
    copy["conditions"] = [{k: v for k, v in c.items() if k != "lastTransitionTime"} for c in status.get("conditions") or []]
    return copy
