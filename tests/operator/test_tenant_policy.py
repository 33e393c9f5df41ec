"""Tenant resources → the gateways' policy and each Tenant's status (operator/tenant_policy.py; pure, no server)."""

from __future__ import annotations

import base64
import json

from lorafleet.bearer import key_hash
from lorafleet.operator.desired import fleet_objects
from lorafleet.operator.tenant_policy import policy_secret, render, selects

NOW = "2026-12-03T00:00:00Z"
ACME_KEYS = ["acme-key-0123456789", "acme-key-abcdefghij"]


def tenant(name: str, secrets: list[dict], **spec) -> dict:
    return {"metadata": {"name": name, "generation": 3}, "spec": {"baseModel": "m", "apiKeys": [{"secretRef": s} for s in secrets], **spec}}


def secret(**keys: str) -> dict:
    return {"data": {k: base64.b64encode(v.encode()).decode() for k, v in keys.items()}}


def adapter(name: str, **labels: str) -> dict:
    return {"metadata": {"name": name, "labels": labels}, "spec": {"baseModel": "m"}}


ADAPTERS = [adapter("acme-fr", **{"lorafleet.io/tenant": "acme"}), adapter("acme-de", **{"lorafleet.io/tenant": "acme", "tier": "beta"}),
            adapter("globex-fr", **{"lorafleet.io/tenant": "globex"}), adapter("support", **{"lorafleet.io/shared": "true"}), adapter("plain")]


def test_a_tenant_gets_its_named_and_selected_adapters_its_key_hashes_and_limits() -> None:
    acme = tenant("acme", [{"name": "acme-keys"}], adapters={"names": ["plain"], "selector": {"matchLabels": {"lorafleet.io/tenant": "acme"}}},
                  baseModelAccess=True, limits={"requestsPerMinute": 60, "tokensPerMinute": 10000}, cache={"scope": "Shared"})
    policy, statuses = render([acme], {"acme-keys": secret(keys="\n".join([ACME_KEYS[0], "# a comment", "", ACME_KEYS[1]]))}, ADAPTERS, NOW)
    assert policy == {"enforce": True, "shared": ["support"], "tenants": [{
        "name": "acme", "keyHashes": [key_hash(k) for k in ACME_KEYS], "adapters": ["acme-de", "acme-fr", "plain"], "base": True,
        "limits": {"requestsPerMinute": 60, "tokensPerMinute": 10000}, "cache": "Shared"}]}
    assert not any(k in json.dumps(policy) for k in ACME_KEYS)  # hashes only
    status = statuses["acme"]
    assert (status["phase"], status["keys"], status["adapters"], status["observedGeneration"]) == ("Ready", 2, 4, 3)
    assert status["conditions"][0] | {"lastTransitionTime": None} == {"type": "Ready", "status": "True", "reason": "Enforced",
                                                                      "message": "2 key(s), 4 adapter(s) callable", "lastTransitionTime": None}


def test_selectors_follow_kubernetes_semantics() -> None:
    labels = {"lorafleet.io/tenant": "acme", "tier": "beta"}
    assert selects({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["beta", "gold"]}]}, labels)
    assert not selects({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["beta"]}]}, labels)
    assert selects({"matchExpressions": [{"key": "region", "operator": "DoesNotExist"}]}, labels)
    assert not selects({"matchLabels": {"lorafleet.io/tenant": "acme"}, "matchExpressions": [{"key": "region", "operator": "Exists"}]}, labels)
    assert not selects({}, labels) and not selects(None, labels)  # an empty selector gives a tenant nothing, not everything


def test_missing_secrets_weak_and_conflicting_keys_fail_the_tenant_with_the_reason() -> None:
    shared_key = "the-same-key-for-two"
    tenants = [tenant("acme", [{"name": "acme-keys", "key": "keys"}]), tenant("beta", [{"name": "beta-keys"}]),
               tenant("gone", [{"name": "no-such-secret"}]), tenant("weak", [{"name": "weak-keys"}]),
               tenant("wrong-key", [{"name": "acme-keys", "key": "other"}])]
    secrets = {"acme-keys": secret(keys=f"{ACME_KEYS[0]}\n{shared_key}"), "beta-keys": secret(a=shared_key), "no-such-secret": None,
               "weak-keys": secret(keys="short\nlong-enough-key-0001")}
    policy, statuses = render(tenants, secrets, ADAPTERS, NOW)
    hashes = {t["name"]: t["keyHashes"] for t in policy["tenants"]}
    assert hashes["acme"] == [key_hash(ACME_KEYS[0])] and hashes["beta"] == []  # the shared key belongs to neither
    assert statuses["acme"]["conditions"][0]["reason"] == "KeyConflict" and "beta" in statuses["acme"]["message"]
    assert statuses["beta"]["phase"] == "Failed" and statuses["beta"]["conditions"][0]["reason"] == "KeyConflict"
    assert (statuses["gone"]["phase"], statuses["gone"]["conditions"][0]["reason"]) == ("Failed", "SecretNotFound")
    assert "'no-such-secret' not found" in statuses["gone"]["message"]
    assert statuses["weak"]["conditions"][0]["reason"] == "WeakKey" and hashes["weak"] == [key_hash("long-enough-key-0001")]
    assert statuses["wrong-key"]["conditions"][0]["reason"] == "SecretKeyMissing"
    assert all(t["adapters"] == [] for t in policy["tenants"])  # each still sees only the shared adapter (not listed per tenant)


def test_no_tenant_means_no_enforcement_and_the_secret_is_canonical() -> None:
    policy, statuses = render([], {}, ADAPTERS, NOW)
    assert policy == {"enforce": False, "shared": ["support"], "tenants": []} and statuses == {}
    one, other = policy_secret("m", "ns", policy), policy_secret("m", "ns", dict(reversed(list(policy.items()))))
    assert one == other and one["metadata"]["name"] == "m-tenants" and json.loads(base64.b64decode(one["data"]["policy.json"])) == policy


def test_the_gateways_mount_the_policy_and_split_limits_by_their_number() -> None:
    objects = fleet_objects("m", "ns", {"model": {"id": "x"}, "routing": {"gatewayReplicas": 3}}, "admin", "warm")
    gateway = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "m")
    pod = gateway["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--tenants-file") + 1] == "/etc/lorafleet-tenants/policy.json" and args[args.index("--tenant-gateways") + 1] == "3"
    assert {"name": "tenants", "secret": {"secretName": "m-tenants", "items": [{"key": "policy.json", "path": "policy.json"}]}} in pod["volumes"]
    # Its metrics (every tenant's name and usage) on a port of their own, which the Service names for the scraper only.
    assert args[args.index("--metrics-port") + 1] == "9090" and pod["containers"][0]["livenessProbe"]["httpGet"]["port"] == "metrics"
    service = next(o for o in objects if o["kind"] == "Service" and o["metadata"]["name"] == "m")
    assert [p["name"] for p in service["spec"]["ports"]] == ["http", "metrics"]
