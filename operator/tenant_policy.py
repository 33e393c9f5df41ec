"""Tenant resources (with their key Secrets and the fleet's Adapters) → the gateways' policy, and each Tenant's status.

Pure functions. The policy is the JSON the gateway reads (gateway/tenants.py): tenants by the SHA-256 of their keys —
the keys themselves never leave their Secrets, and the policy is itself a Secret (``<basemodel>-tenants``) because
key hashes still deserve one. A Tenant may call the Adapters it names and those its selector matches (by their
labels, as a Deployment selects Pods), plus every Adapter labelled ``lorafleet.io/shared: "true"``; the base model
when ``spec.baseModelAccess`` is true. Enforcement is on while any Tenant names the fleet; with none, the gateway
is as it was without tenants (its ``apiKeySecretRef``, or open).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from lorafleet.bearer import key_hash
from lorafleet.operator.desired import POLICY_KEY, labels, tenants_secret_name
from lorafleet.operator.fleet_status import condition

SHARED_LABEL = "lorafleet.io/shared"
MIN_KEY_LENGTH = 16  # a guessable key is refused rather than enforced


def selects(selector: dict[str, Any] | None, labels_: dict[str, str]) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions: In, NotIn, Exists, DoesNotExist). An empty or
    absent selector selects nothing here: a Tenant gets adapters only by saying which."""
    if not selector or not (selector.get("matchLabels") or selector.get("matchExpressions")):
        return False
    if any(labels_.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = expression["key"], expression["operator"], expression.get("values") or []
        present = key in labels_
        if ((operator == "In" and not (present and labels_[key] in values)) or (operator == "NotIn" and present and labels_[key] in values)
                or (operator == "Exists" and not present) or (operator == "DoesNotExist" and present)):
            return False
    return True


def secret_keys(secret: dict[str, Any] | None, key: str | None) -> list[str] | str:
    """The API keys a Secret holds (one per line; blank lines and ``#`` comments skipped) under ``key``, or under every
    key when None; a string says what is wrong."""
    if secret is None:
        return "not found"
    data = secret.get("data") or {}
    if key is not None and key not in data:
        return f"has no key {key!r}"
    found = []
    for name in [key] if key is not None else sorted(data):
        for line in base64.b64decode(data[name]).decode("utf-8", "replace").splitlines():
            if line.strip() and not line.strip().startswith("#"):
                found.append(line.strip())
    return found


def render(tenants: list[dict[str, Any]], secrets: dict[str, dict[str, Any] | None], adapters: list[dict[str, Any]],
           now: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(the gateways' policy, each Tenant's status by name). ``tenants``: the fleet's Tenant objects; ``secrets``: every
    Secret they reference, by name (None: absent); ``adapters``: the fleet's Adapter objects. A key listed by two
    Tenants belongs to neither (the later one by name is Failed with KeyConflict, and the key is left out of both: a
    key must never grant what its owner did not expect)."""
    shared = sorted(a["metadata"]["name"] for a in adapters if (a["metadata"].get("labels") or {}).get(SHARED_LABEL) == "true")
    owners: dict[str, list[str]] = {}
    keys_of: dict[str, list[str]] = {}
    problems: dict[str, list[tuple[str, str]]] = {}
    for tenant in sorted(tenants, key=lambda t: t["metadata"]["name"]):
        name, spec = tenant["metadata"]["name"], tenant.get("spec") or {}
        found: list[str] = []
        for ref in spec.get("apiKeys") or []:
            secret_ref = ref.get("secretRef") or {}
            keys = secret_keys(secrets.get(secret_ref.get("name", "")), secret_ref.get("key"))
            if isinstance(keys, str):
                problems.setdefault(name, []).append(("SecretNotFound" if keys == "not found" else "SecretKeyMissing", f"Secret {secret_ref.get('name')!r} {keys}"))
                continue
            weak = [k for k in keys if len(k) < MIN_KEY_LENGTH]
            if weak:
                problems.setdefault(name, []).append(("WeakKey", f"Secret {secret_ref.get('name')!r} holds {len(weak)} key(s) shorter than "
                                                      f"{MIN_KEY_LENGTH} characters; they are not accepted"))
            found += [k for k in keys if len(k) >= MIN_KEY_LENGTH]
        keys_of[name] = [key_hash(k) for k in dict.fromkeys(found)]
        for hashed in keys_of[name]:
            owners.setdefault(hashed, []).append(name)
    policy_tenants, statuses = [], {}
    for tenant in sorted(tenants, key=lambda t: t["metadata"]["name"]):
        meta, spec = tenant["metadata"], tenant.get("spec") or {}
        name = meta["name"]
        conflicted = [h for h in keys_of[name] if len(owners[h]) > 1]
        if conflicted:
            others = sorted({o for h in conflicted for o in owners[h]} - {name})
            problems.setdefault(name, []).append(("KeyConflict", f"{len(conflicted)} key(s) also belong to Tenant(s) {', '.join(others)}; "
                                                  "they are accepted for no tenant"))
        hashes = [h for h in keys_of[name] if len(owners[h]) == 1]
        wanted = spec.get("adapters") or {}
        named = set(wanted.get("names") or [])
        mine = sorted(a["metadata"]["name"] for a in adapters
                      if a["metadata"]["name"] in named or selects(wanted.get("selector"), a["metadata"].get("labels") or {}))
        entry: dict[str, Any] = {"name": name, "keyHashes": hashes, "adapters": mine, "base": bool(spec.get("baseModelAccess", False))}
        if spec.get("limits"):
            entry["limits"] = {k: v for k, v in spec["limits"].items() if v is not None}
        if (spec.get("cache") or {}).get("scope") == "Shared":
            entry["cache"] = "Shared"
        policy_tenants.append(entry)
        statuses[name] = tenant_status(meta.get("generation", 1), len(hashes), len(set(mine) | set(shared)), problems.get(name, []), now)
    return {"enforce": bool(tenants), "shared": shared, "tenants": policy_tenants}, statuses


def tenant_status(generation: int, keys: int, adapters: int, problems: list[tuple[str, str]], now: str) -> dict[str, Any]:
    """Ready when every key reference resolved and at least one key is accepted; else Failed with the first problem's
    reason (every problem in the message)."""
    if not problems and keys == 0:
        problems = [("NoKeys", "no API key: list Secrets under spec.apiKeys")]
    ok = not problems
    reason, message = ("Enforced", f"{keys} key(s), {adapters} adapter(s) callable") if ok else (problems[0][0], "; ".join(m for _, m in problems))
    return {"phase": "Ready" if ok else "Failed", "keys": keys, "adapters": adapters, "observedGeneration": generation, "message": message,
            "conditions": [condition("Ready", ok, reason, message, now)]}


def policy_secret(base: str, namespace: str, policy: dict[str, Any]) -> dict[str, Any]:
    """The policy as the gateways mount it. Its bytes are canonical (sorted keys), so an unchanged policy is no write."""
    text = json.dumps(policy, sort_keys=True, separators=(",", ":"))
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": tenants_secret_name(base), "namespace": namespace, "labels": labels(base, "gateway")},
            "data": {POLICY_KEY: base64.b64encode(text.encode()).decode()}}
