"""A fleet's tenants, kept in its gateways' policy Secret: one pass reads, renders (tenant_policy.py) and writes on change.

Passes run when a Tenant changes, when an Adapter of the fleet appears, goes or changes its labels (a selector may now
match it), when the BaseModel reconciles, and every ``poll_s``: the operator is not allowed to list or watch Secrets
(it may read the ones it is named), so a rotated key is seen by re-reading the named Secrets. A rotated key therefore
stops working within ``poll_s`` plus the kubelet's Secret refresh (about a minute by default) on a cluster, and within
``poll_s`` plus half a second under ``lorafleet up``. Nothing is written when nothing changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from lorafleet.operator.fleet_status import keep_transition_times
from lorafleet.operator.tenant_policy import policy_secret, render
from lorafleet.operator.wakeable import Wakeable
from lorafleet.timestamps import now_text

log = logging.getLogger(__name__)
GROUP_VERSION = "lorafleet.io/v1alpha1"
COALESCE_S = 0.2


def sync_tenants(kube: Any, namespace: str, base: str) -> dict[str, Any]:
    """One pass for the fleet ``base``: the policy Secret applied, each Tenant's status merged where it changed.
    Sync (its API calls block): the BaseModel handler runs it in kopf's worker thread, the loop in an executor."""
    owner = kube.get(GROUP_VERSION, "BaseModel", namespace, base)
    if owner is None:
        return {}
    tenants = [t for t in kube.list(GROUP_VERSION, "Tenant", namespace) if (t.get("spec") or {}).get("baseModel") == base]
    names = {ref["secretRef"]["name"] for t in tenants for ref in (t["spec"].get("apiKeys") or []) if (ref.get("secretRef") or {}).get("name")}
    secrets = {name: kube.get("v1", "Secret", namespace, name) for name in sorted(names)}
    # without Tenants the policy is not enforced and names no adapter: 10,000 Adapters are not listed every poll for nothing
    adapters = [a for a in kube.list(GROUP_VERSION, "Adapter", namespace) if (a.get("spec") or {}).get("baseModel") == base] if tenants else []
    policy, statuses = render(tenants, secrets, adapters, now_text())
    secret = policy_secret(base, namespace, policy)
    secret["metadata"]["ownerReferences"] = [{"apiVersion": GROUP_VERSION, "kind": "BaseModel", "name": base, "uid": owner["metadata"]["uid"],
                                              "controller": True, "blockOwnerDeletion": True}]
    outcome, _ = kube.apply(secret)
    if outcome != "unchanged":
        log.info("tenants of %s/%s: policy %s (%d tenants, %d keys)", namespace, base, outcome, len(policy["tenants"]),
                 sum(len(t["keyHashes"]) for t in policy["tenants"]))
    for tenant in tenants:
        old = tenant.get("status") or {}
        new = keep_transition_times(statuses[tenant["metadata"]["name"]], old)
        if {k: old.get(k) for k in new} != new:
            kube.merge_status(GROUP_VERSION, "Tenant", namespace, tenant["metadata"]["name"], new)
    return policy


class TenantLoop(Wakeable):
    """The passes of one fleet, coalesced: a burst of events is one pass, and a pass is never two at once."""

    def __init__(self, namespace: str, base: str, kube: Any, executor: Any, poll_s: float) -> None:
        super().__init__()
        self.namespace, self.base, self.kube, self.executor, self.poll_s = namespace, base, kube, executor, poll_s
        self._adapter_labels: dict[str, tuple] = {}
        self._tenants = 0  # Tenants of the fleet at the last pass: with none, Adapters do not change the policy

    def adapter_seen(self, name: str, labels: dict[str, str] | None, deleted: bool) -> None:
        """An Adapter event: a pass only when the set of adapters or their labels changed (statuses change all the time)."""
        key = None if deleted else tuple(sorted((labels or {}).items()))
        if self._adapter_labels.get(name, "unseen") != key:
            if deleted:
                self._adapter_labels.pop(name, None)
            else:
                self._adapter_labels[name] = key
            if self._tenants:  # a thousand Adapters created at once wake nothing in a fleet without tenants
                self.wake_up()

    async def run(self, stopped: Any) -> None:
        self._loop = asyncio.get_running_loop()
        while not stopped:
            self.wake.clear()
            try:
                policy = await self._loop.run_in_executor(self.executor, sync_tenants, self.kube, self.namespace, self.base)
                self._tenants = len(policy.get("tenants") or [])
            except Exception:  # an API hiccup or a bug: the next wake-up or poll tries again
                log.exception("tenants of %s/%s: pass failed", self.namespace, self.base)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), self.poll_s)
            await asyncio.sleep(COALESCE_S)
