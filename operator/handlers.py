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

from lorafleet.bearer import authorization
from lorafleet.operator.adapter_status import FINALIZER, AdapterRecord, next_status, unplaced
from lorafleet.operator.autoscale_loop import DEMAND_ANNOTATION, AutoscaleLoop
from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.desired import ADMIN_TOKEN_KEY, WARM_TOKEN_KEY, admin_secret_name, fleet_objects, replica_name, with_tracing_default
from lorafleet.operator.fleet import Fleet
from lorafleet.operator.fleet_io import FleetIO, PodView
from lorafleet.operator.fleet_status import basemodel_status, keep_transition_times
from lorafleet.operator.kube import Kube, login
from lorafleet.operator.replica_client import ReplicaCalls
from lorafleet.operator.tenant_policy import tenant_status
from lorafleet.operator.tenant_sync import TenantLoop, sync_tenants
from lorafleet.timestamps import now_text

GROUP, VERSION = "lorafleet.io", "v1alpha1"
KOPF_FINALIZER = "lorafleet.io/operator"  # kopf's, on BaseModels (their daemon)
REPLICA_LABELS = {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/component": "replica"}


class Operator:
    """What the handlers share for the operator's lifetime: one API client, one pool, the fleets."""

    def __init__(self, config: OperatorConfig, kube_factory: Any = Kube) -> None:
        self.config, self.kube_factory = config, kube_factory
        self.fleets: dict[tuple[str, str], Fleet] = {}
        self.tenant_loops: dict[tuple[str, str], TenantLoop] = {}
        self.autoscalers: dict[tuple[str, str], AutoscaleLoop] = {}
        self.kube: Any = None
        self.executor: concurrent.futures.ThreadPoolExecutor | None = None
        self.calls: ReplicaCalls | None = None

    def start(self) -> None:
        self.kube = self.kube_factory()
        self.executor = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="lorafleet-operator")
        self.calls = ReplicaCalls(self.config.replica_concurrency)

    async def stop(self) -> None:
        if self.calls is not None:
            await self.calls.close()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    def wake(self, key: tuple[str, str]) -> None:
        """Any thread may call it (kopf runs sync handlers in worker threads): see Wakeable.wake_up (operator/wakeable.py)."""
        fleet = self.fleets.get(key)
        if fleet is not None:
            fleet.wake_up()

    def autoscaler(self, namespace: str, name: str, adapters: Any = dict) -> AutoscaleLoop:
        key = (namespace, name)
        if key not in self.autoscalers:
            self.autoscalers[key] = AutoscaleLoop(namespace, name, self.kube, self.executor, self.calls, post_event, adapters,
                                                  lambda owners: self._set_owners(key, owners))
        return self.autoscalers[key]

    def _set_owners(self, key: tuple[str, str], owners: dict[str, int]) -> None:
        """Hot adapters' owner counts into the fleet's placement (and its catalogue, for the gateways), on the loop."""
        fleet = self.fleets.get(key)
        if fleet is not None and fleet.demand_owners != owners:
            fleet.demand_owners = owners
            fleet.wake.set()

    def tenant_loop(self, namespace: str, name: str) -> TenantLoop:
        key = (namespace, name)
        if key not in self.tenant_loops:
            self.tenant_loops[key] = TenantLoop(namespace, name, self.kube, self.executor, self.config.tenant_key_poll_s)
        return self.tenant_loops[key]

    def fleet(self, namespace: str, name: str) -> Fleet:
        key = (namespace, name)
        if key not in self.fleets:
            io = FleetIO(kube=self.kube, executor=self.executor, calls=self.calls, event=post_event,
                         admin_headers=lambda: admin_headers(self.kube, namespace, name))
            self.fleets[key] = Fleet(namespace, name, io, self.config.residency_check_s)
        return self.fleets[key]


def post_event(obj: dict[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(obj, type=kind, reason=reason, message=message)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig | None = None, kube_factory: Any = Kube) -> kopf.OperatorRegistry:
    """Attach the handlers below to ``registry`` (the global one for ``lorafleet operator``, a fresh one in tests).

    The handlers are module-level functions, as in kopf's examples; what they share lives in kopf's ``memo``
    (``memo.operator``), made at startup from ``config`` (operator/config.py). Its ``residency_check_s`` is the safety
    net, how often every replica's listing is re-read; events do the real work, so a test may set it to hours.
    """
    config = config or OperatorConfig()

    def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
        settings.persistence.finalizer = KOPF_FINALIZER
        settings.watching.server_timeout = 300  # a stalled watch is reopened by the server...
        settings.watching.client_timeout = 330  # ...or, failing that, by the client
        settings.posting.level = 20  # Events for every decision at INFO and above
        memo.operator = Operator(config, kube_factory)
        memo.operator.start()

    kopf.on.startup(registry=registry)(configure)
    kopf.on.cleanup(registry=registry)(close)
    kopf.on.login(registry=registry)(login)
    for on in (kopf.on.create, kopf.on.resume):
        on(GROUP, VERSION, "basemodels", registry=registry)(reconcile_basemodel)
    kopf.on.update(GROUP, VERSION, "basemodels", field="spec", registry=registry)(reconcile_basemodel)
    kopf.timer(GROUP, VERSION, "basemodels", interval=config.status_interval, registry=registry)(refresh_basemodel)
    kopf.index(GROUP, VERSION, "basemodels", id="basemodels", registry=registry)(basemodels)
    kopf.daemon(GROUP, VERSION, "basemodels", cancellation_timeout=2.0, registry=registry)(place_adapters)
    kopf.index(GROUP, VERSION, "adapters", id="adapters_by_fleet", registry=registry)(adapters_by_fleet)
    kopf.index("", "v1", "pods", labels=REPLICA_LABELS, id="replica_pods", registry=registry)(replica_pods)
    kopf.on.event("", "v1", "pods", labels=REPLICA_LABELS, registry=registry)(replica_pod_event)
    kopf.on.event(GROUP, VERSION, "adapters", registry=registry)(adapter_event)
    kopf.daemon(GROUP, VERSION, "basemodels", cancellation_timeout=2.0, registry=registry)(keep_tenant_policy)
    kopf.on.event(GROUP, VERSION, "tenants", registry=registry)(tenant_event)
    kopf.daemon(GROUP, VERSION, "basemodels", cancellation_timeout=2.0, registry=registry)(autoscale)
    kopf.on.event(GROUP, VERSION, "basemodels", registry=registry)(basemodel_event)
    return registry


async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.operator.stop()


# -- BaseModel ----------------------------------------------------------------------------------

def reconcile_basemodel(body: kopf.Body, spec: kopf.Spec, status: kopf.Status, name: str, namespace: str, meta: kopf.Meta, patch: kopf.Patch,
                        memo: kopf.Memo, **_: Any) -> None:
    """Sync, so in one of kopf's worker threads: its API calls block. It wakes the fleet loop through the loop's own
    thread-safe door (Operator.wake), never by touching the loop's objects from here."""
    operator: Operator = memo.operator
    kube = operator.kube
    changed = []
    desired = with_tracing_default(dict(spec), operator.config.otlp_endpoint)  # the operator's --otlp-endpoint unless the BaseModel names one
    tokens = fleet_tokens(kube, namespace, name)
    for obj in fleet_objects(name, namespace, desired, tokens.get(ADMIN_TOKEN_KEY) or secrets.token_urlsafe(32),
                             tokens.get(WARM_TOKEN_KEY) or secrets.token_urlsafe(32)):
        kopf.adopt(obj, owner=body)
        outcome, _ = kube.apply(obj)
        if outcome != "unchanged":
            changed.append(f"{obj['kind']}/{obj['metadata']['name']} {outcome}")
    sync_tenants(kube, namespace, name)  # the gateways mount the policy Secret: it exists from the first reconcile
    if changed:
        kopf.info(body, reason="Reconciled", message="; ".join(changed))
    refresh_basemodel(name, namespace, spec, meta, status, patch, memo)
    operator.wake((namespace, name))


def refresh_basemodel(name: str, namespace: str, spec: kopf.Spec, meta: kopf.Meta, status: kopf.Status, patch: kopf.Patch, memo: kopf.Memo,
                      **_: Any) -> None:
    observed = keep_transition_times(observe_basemodel(memo.operator.kube, name, namespace, meta.get("generation", 1), dict(spec)), dict(status))
    if observed != {k: status.get(k) for k in observed}:
        patch.status.update(observed)


async def basemodels(namespace: str, name: str, **_: Any) -> dict:
    return {(namespace, name): name}


async def place_adapters(name: str, namespace: str, spec: kopf.Spec, stopped: kopf.DaemonStopped, adapters_by_fleet: kopf.Index,
                         replica_pods: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    """The fleet's placement loop, for as long as the BaseModel exists."""
    operator: Operator = memo.operator
    key = (namespace, name)
    fleet = operator.fleet(namespace, name)
    try:
        await fleet.run(lambda: adapters_by_fleet.get(key, []), lambda: replica_pods.get(key, []), lambda: dict(spec.get("engine") or {}), stopped)
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            operator.fleets.pop(key, None)
            for record in list(adapters_by_fleet.get(key, [])):
                await orphaned(operator, record)


# -- Adapters and replica Pods: indexed from their watch events; async, so on the loop the fleets run on ----------

async def adapters_by_fleet(body: kopf.Body, namespace: str, memo: kopf.Memo, **_: Any) -> dict:
    record = AdapterRecord.from_body(body)
    memo.operator.wake((namespace, record.base))
    return {(namespace, record.base): record}


async def replica_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> dict:
    key = (namespace, labels.get("app.kubernetes.io/instance", ""))
    memo.operator.wake(key)
    return {key: PodView.from_body(body)}


async def replica_pod_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    """Deletions leave the index without calling it: wake the fleet for every event."""
    memo.operator.wake((namespace, labels.get("app.kubernetes.io/instance", "")))


async def adapter_event(body: kopf.Body, namespace: str, type: str | None, basemodels: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    record = AdapterRecord.from_body(body)
    if (namespace, record.base) in basemodels:
        memo.operator.wake((namespace, record.base))
        loop = memo.operator.tenant_loops.get((namespace, record.base))
        if loop is not None:  # a selector may match it now (or no longer)
            loop.adapter_seen(record.name, dict(body.get("metadata", {}).get("labels") or {}), type == "DELETED")
    elif type != "DELETED":
        await orphaned(memo.operator, record)


async def orphaned(state: Operator, record: AdapterRecord) -> None:
    """An Adapter whose BaseModel does not exist: Failed with the reason, and free to be deleted."""
    loop = asyncio.get_running_loop()
    if record.deleting:
        if FINALIZER in record.finalizers:
            await loop.run_in_executor(state.executor, lambda: state.kube.merge(f"{GROUP}/{VERSION}", "Adapter", record.namespace, record.name,
                                                                                record.finalizer_patch(False)))
        return
    message = f"BaseModel {record.base!r} does not exist in {record.namespace}"
    status = next_status(record.status, unplaced(record, "Failed", "BaseModelNotFound", message), now_text())
    if status is not None:
        await loop.run_in_executor(state.executor, lambda: state.kube.merge_status(f"{GROUP}/{VERSION}", "Adapter", record.namespace, record.name, status))
        if record.status.get("phase") != "Failed":
            post_event(record.reference, "Warning", "BaseModelNotFound", message)


# -- Autoscaling (autoscale_loop.py) -------------------------------------------------------------------------------

async def autoscale(name: str, namespace: str, spec: kopf.Spec, stopped: kopf.DaemonStopped, replica_pods: kopf.Index,
                    adapters_by_fleet: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    """The fleet's autoscaler, for as long as the BaseModel exists (idle while spec.autoscaling.enabled is false)."""
    operator: Operator = memo.operator
    key = (namespace, name)

    def registered() -> dict[str, int]:
        return {r.name: r.warm for r in adapters_by_fleet.get(key, []) if not r.deleting}

    try:
        await operator.autoscaler(namespace, name, registered).run(lambda: dict(spec), lambda: list(replica_pods.get(key, [])), stopped)
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            operator.autoscalers.pop(key, None)


async def basemodel_event(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
    """A gateway's demand stamp (a request found no ready replica) acts at once; so does a change of spec.autoscaling."""
    loop = memo.operator.autoscalers.get((namespace, name))
    if loop is None:
        return
    loop.demand_stamped((body.get("metadata", {}).get("annotations") or {}).get(DEMAND_ANNOTATION))
    settings = dict((body.get("spec") or {}).get("autoscaling") or {})
    if settings != loop.settings_seen:
        loop.settings_seen = settings
        loop.wake_up()


# -- Tenants: few (a hundred per fleet), so any Tenant event re-renders the namespace's policies -------------------------

async def keep_tenant_policy(name: str, namespace: str, stopped: kopf.DaemonStopped, memo: kopf.Memo, **_: Any) -> None:
    """The fleet's tenant policy loop (tenant_sync.py), for as long as the BaseModel exists."""
    operator: Operator = memo.operator
    try:
        await operator.tenant_loop(namespace, name).run(stopped)
    finally:
        if stopped.reason is not None and stopped.reason & kopf.DaemonStoppingReason.RESOURCE_DELETED:
            operator.tenant_loops.pop((namespace, name), None)


async def tenant_event(body: kopf.Body, namespace: str, type: str | None, basemodels: kopf.Index, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo.operator
    for (loop_namespace, _), loop in list(operator.tenant_loops.items()):
        if loop_namespace == namespace:  # its fleet, and the one it may have left (spec.baseModel changed)
            loop.wake_up()
    base = (body.get("spec") or {}).get("baseModel", "")
    if type != "DELETED" and (namespace, base) not in basemodels:
        message = f"BaseModel {base!r} does not exist in {namespace}"
        old = dict(body.get("status") or {})
        status = keep_transition_times({**tenant_status(body.get("metadata", {}).get("generation", 1), 0, 0, [("BaseModelNotFound", message)],
                                                        now_text())}, old)
        if {k: old.get(k) for k in status} != status:
            name = body["metadata"]["name"]
            await asyncio.get_running_loop().run_in_executor(
                operator.executor, lambda: operator.kube.merge_status(f"{GROUP}/{VERSION}", "Tenant", namespace, name, status))


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
    return authorization(token)


def observe_basemodel(kube: Kube, name: str, namespace: str, generation: int, spec: dict) -> dict:
    replicas = kube.get("apps/v1", "Deployment", namespace, replica_name(name))
    gateway = kube.get("apps/v1", "Deployment", namespace, name)
    return basemodel_status(name, namespace, generation, spec, replicas, gateway, now_text())
