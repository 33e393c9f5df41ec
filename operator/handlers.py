"""The kopf handlers: BaseModels become fleets by change handlers; Adapters are placed by one loop per fleet.

BaseModel create/update/resume handlers apply the objects desired.py derives (few objects, so
kopf's bookkeeping is cheap). Adapters are many — a thousand per BaseModel is the design point — so
they get no per-object handler, timer or bookkeeping annotation: kopf indexes their watch events
(and the replica Pods') in memory, and a daemon per BaseModel (fleet.py) reconciles the whole set,
woken by those events. Everything the operator needs lives in the objects, so a restart re-derives
the same state: one list per resource and one GET /adapters per replica, and no writes when
nothing changed.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import secrets
from typing import Any

import kopf

from lorafleet.operator.adapter_status import FINALIZER, AdapterRecord, next_status
from lorafleet.operator.desired import ADMIN_TOKEN_KEY, WARM_TOKEN_KEY, admin_secret_name, fleet_objects, replica_name, with_tracing_default
from lorafleet.operator.fleet import Fleet, FleetIO, PodView, now_text
from lorafleet.operator.fleet_status import basemodel_status, keep_transition_times
from lorafleet.operator.kube import Kube, login
from lorafleet.operator.replica_client import ReplicaCalls

GROUP, VERSION = "lorafleet.io", "v1alpha1"
KOPF_FINALIZER = "lorafleet.io/operator"  # kopf's, on BaseModels (their daemon)
REPLICA_LABELS = {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/component": "replica"}


class Operator:
    """What the handlers share for the operator's lifetime: one API client, one pool, the fleets."""

    def __init__(self, kube_factory: Any, residency_check_s: float, per_replica: int) -> None:
        self.kube_factory, self.residency_check_s, self.per_replica = kube_factory, residency_check_s, per_replica
        self.fleets: dict[tuple[str, str], Fleet] = {}
        self.kube: Any = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.calls: ReplicaCalls | None = None

    def start(self) -> None:
        self.kube = self.kube_factory()
        self.executor = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="lorafleet-operator")
        self.calls = ReplicaCalls(self.per_replica)

    async def stop(self) -> None:
        if self.calls is not None:
            await self.calls.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def wake(self, key: tuple[str, str]) -> None:
        fleet = self.fleets.get(key)
        if fleet is not None:
            fleet.wake.set()

    def fleet(self, namespace: str, name: str) -> Fleet:
        key = (namespace, name)
        if key not in self.fleets:
            io = FleetIO(kube=self.kube, executor=self.executor, calls=self.calls, event=post_event,
                         admin_headers=lambda: admin_headers(self.kube, namespace, name))
            self.fleets[key] = Fleet(namespace, name, io, self.residency_check_s)
        return self.fleets[key]


def post_event(obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(obj, type=kind, reason=reason, message=message)


def register(registry: kopf.OperatorRegistry, kube_factory: Any = Kube, residency_check_s: float = 300.0, status_interval: float = 5.0,
             per_replica: int = 4, otlp_endpoint: str | None = None) -> kopf.OperatorRegistry:
    """Attach the handlers to ``registry`` (the global one for ``lorafleet operator``, a fresh one in tests).

    ``residency_check_s``: the safety net, how often every replica's listing is re-read; events
    do the real work, so a test may set it to hours.
    """
    state = Operator(kube_factory, residency_check_s, per_replica)

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = KOPF_FINALIZER
        settings.watching.server_timeout = 300  # a stalled watch is reopened by the server...
        settings.watching.client_timeout = 330  # ...or, failing that, by the client
        settings.posting.level = 20  # Events for every decision at INFO and above
        state.start()

    @kopf.on.cleanup(registry=registry)
    async def close(**_: Any) -> None:
        await state.stop()

    kopf.on.login(registry=registry)(login)

    # -- BaseModel ------------------------------------------------------------------------------

    @kopf.on.create(GROUP, VERSION, "basemodels", registry=registry)
    @kopf.on.update(GROUP, VERSION, "basemodels", field="spec", registry=registry)
    @kopf.on.resume(GROUP, VERSION, "basemodels", registry=registry)
    def reconcile_basemodel(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, meta: kopf.Meta, patch: kopf.Patch,
                            **_: Any) -> None:
        kube = state.kube
        changed = []
        desired = with_tracing_default(dict(spec), otlp_endpoint)  # the operator's --otlp-endpoint unless the BaseModel names one
        tokens = fleet_tokens(kube, namespace, name)
        for obj in fleet_objects(name, namespace, desired, tokens.get(ADMIN_TOKEN_KEY) or secrets.token_urlsafe(32),
                                 tokens.get(WARM_TOKEN_KEY) or secrets.token_urlsafe(32)):
            kopf.adopt(obj, owner=body)
            outcome, _ = kube.apply(obj)
            if outcome != "unchanged":
                changed.append(f"{obj['kind']}/{obj['metadata']['name']} {outcome}")
        if changed:
            kopf.info(body, reason="Reconciled", message="; ".join(changed))
        observed = keep_transition_times(observe_basemodel(kube, name, namespace, meta.get("generation", 1), dict(spec)), dict(status))
        if observed != {k: status.get(k) for k in observed}:
            patch.status.update(observed)
        state.wake((namespace, name))

    @kopf.timer(GROUP, VERSION, "basemodels", interval=status_interval, registry=registry)
    def refresh_basemodel(name: str, namespace: str, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, **_: Any) -> None:
        observed = keep_transition_times(observe_basemodel(state.kube, name, namespace, meta.get("generation", 1), dict(spec)), dict(status))
        if observed != {k: status.get(k) for k in observed}:
            patch.status.update(observed)

    @kopf.index(GROUP, VERSION, "basemodels", id="basemodels", registry=registry)
    def basemodels(namespace: str, name: str, **_: Any) -> dict:
        return {(namespace, name): name}

    @kopf.daemon(GROUP, VERSION, "basemodels", cancellation_timeout=2.0, registry=registry)
    async def place_adapters(name: str, namespace: str, spec: kopf.Spec, stopped: kopf.DaemonStopped, adapters_by_fleet: kopf.Index,
                             replica_pods: kopf.Index, **_: Any) -> None:
        """The fleet's placement loop, for as long as the BaseModel exists."""
        key = (namespace, name)
        fleet = state.fleet(namespace, name)
        try:
            await fleet.run(lambda: adapters_by_fleet.get(key, []), lambda: replica_pods.get(key, []),
                            lambda: dict(spec.get("engine") or {}), stopped)
        finally:
            if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
                state.fleets.pop(key, None)
                for record in list(adapters_by_fleet.get(key, [])):
                    await orphaned(state, record)

    # -- Adapters and replica Pods: indexed from their watch events -----------------------------

    @kopf.index(GROUP, VERSION, "adapters", id="adapters_by_fleet", registry=registry)
    def adapters_by_fleet(body: kopf.Body, namespace: str, **_: Any) -> dict:
        record = AdapterRecord.from_body(body)
        state.wake((namespace, record.base))
        return {(namespace, record.base): record}

    @kopf.index("", "v1", "pods", labels=REPLICA_LABELS, id="replica_pods", registry=registry)
    def replica_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict:
        key = (namespace, labels.get("app.kubernetes.io/instance", ""))
        state.wake(key)
        return {key: PodView.from_body(body)}

    @kopf.on.event("", "v1", "pods", labels=REPLICA_LABELS, registry=registry)
    def replica_pod_event(namespace: str, labels: kopf.Labels, **_: Any) -> None:
        """Deletions leave the index without calling it: wake the fleet for every event."""
        state.wake((namespace, labels.get("app.kubernetes.io/instance", "")))

    @kopf.on.event(GROUP, VERSION, "adapters", registry=registry)
    async def adapter_event(body: kopf.Body, namespace: str, type: str | None, basemodels: kopf.Index, **_: Any) -> None:
        record = AdapterRecord.from_body(body)
        if (namespace, record.base) in basemodels:
            state.wake((namespace, record.base))
        elif type != "DELETED":
            await orphaned(state, record)

    return registry


async def orphaned(state: Operator, record: AdapterRecord) -> None:
    """An Adapter whose BaseModel does not exist: Failed with the reason, and free to be deleted."""
    loop = asyncio.get_running_loop()
    if record.deleting:
        if FINALIZER in record.finalizers:
            await loop.run_in_executor(state.executor, lambda: state.kube.merge(f"{GROUP}/{VERSION}", "Adapter", record.namespace, record.name,
                                                                                record.finalizer_patch(False)))
        return
    message = f"BaseModel {record.base!r} does not exist in {record.namespace}"
    status = next_status(record.status, {"phase": "Failed", "reason": "BaseModelNotFound", "message": message,
                                         "observedGeneration": record.generation, "replicas": [], "hotOn": ""}, now_text())
    if status is not None:
        await loop.run_in_executor(state.executor, lambda: state.kube.merge_status(f"{GROUP}/{VERSION}", "Adapter", record.namespace, record.name, status))
        if record.status.get("phase") != "Failed":
            post_event(record.reference, "Warning", "BaseModelNotFound", message)


def fleet_tokens(kube: Kube, namespace: str, base: str) -> dict[str, str]:
    """The fleet's tokens from its Secret, by key (none before the BaseModel first reconciled; a Secret made before the
    warm token existed has only the admin token, and the next reconcile adds the other)."""
    secret = kube.get("v1", "Secret", namespace, admin_secret_name(base))
    return {key: base64.b64decode(value).decode() for key, value in ((secret or {}).get("data") or {}).items()}


def admin_token(kube: Kube, namespace: str, base: str) -> str | None:
    """The fleet's admin token from its Secret (None before the BaseModel first reconciled)."""
    return fleet_tokens(kube, namespace, base).get(ADMIN_TOKEN_KEY)


def admin_headers(kube: Kube, namespace: str, base: str) -> dict[str, str]:
    token = admin_token(kube, namespace, base)
    return {"authorization": f"Bearer {token}"} if token else {}


def observe_basemodel(kube: Kube, name: str, namespace: str, generation: int, spec: dict) -> dict:
    replicas = kube.get("apps/v1", "Deployment", namespace, replica_name(name))
    gateway = kube.get("apps/v1", "Deployment", namespace, name)
    return basemodel_status(name, namespace, generation, spec, replicas, gateway, now_text())
