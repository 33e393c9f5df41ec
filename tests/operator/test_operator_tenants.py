"""Tenants through the operator on the embedded API: Tenant + key Secret + labelled Adapters → the gateways' policy Secret."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from support.operator import BASEMODEL, adapter, custom, operator_running
from support.waiting import wait_until

from lorafleet.bearer import key_hash

pytestmark = pytest.mark.e2e

ACME_KEY, ROTATED_KEY = "acme-0123456789abcdef", "acme-rotated-0123456789"


def secret(name: str, *keys: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": {"keys": "\n".join(keys)}})


def tenant(name: str, keys: str, base: str = "smol", **spec) -> str:
    return yaml.safe_dump({"apiVersion": "lorafleet.io/v1alpha1", "kind": "Tenant", "metadata": {"name": name},
                           "spec": {"baseModel": base, "apiKeys": [{"secretRef": {"name": keys}}], **spec}})


def labelled(name: str, **labels: str) -> str:
    doc = yaml.safe_load(adapter(name, f"team/{name}", warm=0))
    doc["metadata"]["labels"] = labels
    return yaml.safe_dump(doc)


def policy(kubectl) -> dict | None:
    found = kubectl("get", "secret", "smol-tenants", "-o", "json", check=False)
    if found.returncode != 0:
        return None
    return json.loads(base64.b64decode(json.loads(found.stdout)["data"]["policy.json"]))


def test_tenants_become_the_gateways_policy_and_a_rotated_key_replaces_the_old_within_the_poll(kube_api, kubectl, monkeypatch) -> None:
    with operator_running(kube_api, kubectl, monkeypatch, tenant_key_poll_s=1.0) as api:
        kubectl("apply", "-f", "-", input=BASEMODEL)
        wait_until(lambda: policy(kubectl) is not None, timeout=20, what="the policy Secret")
        assert policy(kubectl) == {"enforce": False, "shared": [], "tenants": []}  # no Tenant yet: the fleet is as it was
        for doc in (labelled("acme-fr", **{"lorafleet.io/tenant": "acme"}), labelled("support", **{"lorafleet.io/shared": "true"}),
                    labelled("globex-fr", **{"lorafleet.io/tenant": "globex"}), secret("acme-keys", ACME_KEY),
                    tenant("acme", "acme-keys", adapters={"selector": {"matchLabels": {"lorafleet.io/tenant": "acme"}}},
                           limits={"requestsPerMinute": 120})):
            kubectl("apply", "-f", "-", input=doc)
        wanted = {"name": "acme", "keyHashes": [key_hash(ACME_KEY)], "adapters": ["acme-fr"], "base": False, "limits": {"requestsPerMinute": 120}}
        wait_until(lambda: policy(kubectl) == {"enforce": True, "shared": ["support"], "tenants": [wanted]}, timeout=20, what="acme in the policy")
        wait_until(lambda: (custom(api, "tenants", "acme").get("status") or {}).get("phase") == "Ready", timeout=20, what="acme Ready")
        assert custom(api, "tenants", "acme")["status"]["keys"] == 1 and custom(api, "tenants", "acme")["status"]["adapters"] == 2
        row = kubectl("get", "tenants").stdout.splitlines()
        assert row[0].split()[:5] == ["NAME", "BASE", "PHASE", "KEYS", "ADAPTERS"] and row[1].split()[:5] == ["acme", "smol", "Ready", "1", "2"]

        kubectl("label", "adapter", "globex-fr", "lorafleet.io/tenant=acme", "--overwrite")  # a selector follows labels
        wait_until(lambda: policy(kubectl)["tenants"][0]["adapters"] == ["acme-fr", "globex-fr"], timeout=20, what="the relabelled adapter")

        kubectl("apply", "-f", "-", input=secret("acme-keys", ROTATED_KEY))  # rotation: only the Secret changes
        wait_until(lambda: policy(kubectl)["tenants"][0]["keyHashes"] == [key_hash(ROTATED_KEY)], timeout=5, what="the rotated key (poll 1 s)")
        assert ACME_KEY not in kubectl("get", "secret", "smol-tenants", "-o", "yaml").stdout

        kubectl("apply", "-f", "-", input=tenant("lost", "acme-keys", base="no-such-base"))
        wait_until(lambda: (custom(api, "tenants", "lost").get("status") or {}).get("conditions", [{}])[0].get("reason") == "BaseModelNotFound",
                   timeout=20, what="a Tenant of a missing BaseModel fails with the reason")
        kubectl("delete", "tenant", "acme")
        wait_until(lambda: policy(kubectl)["enforce"] is False, timeout=20, what="enforcement off with the last Tenant gone")
