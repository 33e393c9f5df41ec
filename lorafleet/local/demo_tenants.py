"""``lorafleet up``'s two demo tenants, so isolation can be seen working on one machine.

``acme`` and ``globex`` each get a key (made here, kept in the Secret ``<tenant>-keys`` and printed), the base model,
and every other adapter of the root by label (``lorafleet.io/tenant``); with three or more adapters the last is
labelled ``lorafleet.io/shared`` and callable by both. Declared exactly as a user would (Secrets, Tenants, labels), so
what the demo shows is what the operator and gateways do in a cluster. Each tenant's prefix cache is its own.
"""

from __future__ import annotations

import secrets
from typing import Any

TENANTS = ("acme", "globex")
TENANT_LABEL = "lorafleet.io/tenant"
SHARED_LABEL = "lorafleet.io/shared"


def adapter_labels(adapters: list[str]) -> dict[str, dict[str, str]]:
    """Labels by adapter name: alternately acme's and globex's, and the last one shared when there are three or more."""
    labelled = {name: {TENANT_LABEL: TENANTS[i % 2]} for i, name in enumerate(adapters)}
    if len(adapters) >= 3:
        labelled[adapters[-1]] = {SHARED_LABEL: "true"}
    return labelled


def make_keys() -> dict[str, str]:
    return {tenant: f"lf-{tenant}-{secrets.token_urlsafe(18)}" for tenant in TENANTS}


def tenant_objects(base: str, keys: dict[str, str], namespace: str = "default") -> list[dict[str, Any]]:
    """A Secret and a Tenant per demo tenant."""
    objects: list[dict[str, Any]] = []
    for tenant, key in keys.items():
        objects.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": f"{tenant}-keys", "namespace": namespace},
                        "stringData": {"keys": key}})
        objects.append({"apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant, "namespace": namespace},
                        "spec": {"baseModel": base, "apiKeys": [{"secretRef": {"name": f"{tenant}-keys"}}], "baseModelAccess": True,
                                 "adapters": {"selector": {"matchLabels": {TENANT_LABEL: tenant}}},
                                 "limits": {"requestsPerMinute": 600, "concurrentRequests": 16}}})
    return objects


def describe(keys: dict[str, str], labels: dict[str, dict[str, str]]) -> str:
    shared = [name for name, lab in labels.items() if lab.get(SHARED_LABEL) == "true"]
    lines = ["tenants (kubectl get tenants; keys live in the Secrets <tenant>-keys):"]
    for tenant, key in keys.items():
        own = [name for name, lab in labels.items() if lab.get(TENANT_LABEL) == tenant]
        lines.append(f"  {tenant:<7} key {key}  calls the base model, {', '.join(own + shared) or 'no adapter'}")
    lines.append("  export " + " ".join(f"{tenant.upper()}_KEY={key}" for tenant, key in keys.items()))
    return "\n".join(lines)
