"""Tenants at the gateway: whose key it is, which adapters it may call, and how much (issue 32, the gateway's half).

A policy file (JSON, re-read when it changes) lists tenants by the SHA-256 of their API keys, never the keys
themselves, so the file (the Secret ``<basemodel>-tenants`` the operator renders from Tenant resources,
operator/tenant_policy.py) can be read without handing out credentials. ``"enforce": false`` (no Tenant names the
fleet) leaves the gateway as it was without tenants (``--api-key-file`` or open). A key that hashes to no tenant is a
401. A tenant may call the registered names it lists and the fleet's shared ones, and the base model when ``base`` is
true; anything else is a 404 that reads like an unknown adapter's (the gateway does not confirm another tenant's adapter
exists). Limits (gateway/tenant_limits.py): requests and tokens per minute, concurrent requests, tokens per UTC day;
over one, a 429 with Retry-After that names the limit.

Several gateways: each enforces ``limit / gateways`` (``--tenant-gateways``, set to the gateway Deployment's
replicas), so the fleet-wide rate holds when the Service spreads a tenant's connections evenly, and exceeds the
limit by nothing; with one caller pinned to one gateway by a kept-alive connection the tenant gets at most 1/N of
its limit through it. Shared counters would be exact and cost a round trip per request; the split costs nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from lorafleet import ring
from lorafleet.bearer import bearer_token, key_hash
from lorafleet.gateway.tenant_limits import Limits, Tenant

log = logging.getLogger(__name__)


class Tenants:
    """The policy file's tenants by key hash; ``active`` is False without a file (every key, every adapter)."""

    def __init__(self, path: Path | None, gateways: int = 1) -> None:
        self.path, self.gateways = path, max(1, gateways)
        self.shared: frozenset[str] = frozenset()
        self.enforce = path is not None
        self._by_hash: dict[str, Tenant] = {}
        self._mtime: float | None = None
        if path is not None:
            self._reload()

    @property
    def active(self) -> bool:
        """Whether keys are checked against tenants (re-read first: the policy may have turned enforcement on or off)."""
        if self.path is None:
            return False
        self._try_reload()
        return self.enforce

    def _reload(self) -> None:
        assert self.path is not None
        mtime = os.stat(self.path).st_mtime
        if mtime == self._mtime:
            return
        policy = json.loads(self.path.read_text())
        previous = {t.name: t for t in self._by_hash.values()}
        by_hash: dict[str, Tenant] = {}
        for entry in policy.get("tenants") or []:
            tenant = Tenant(str(entry["name"]), frozenset(entry.get("adapters") or ()), bool(entry.get("base", False)),
                            Limits.from_policy(entry.get("limits") or {}, self.gateways), entry.get("cache") == "Shared")
            old = previous.get(tenant.name)
            if old is not None:
                tenant.continue_from(old)
            for hashed in entry.get("keyHashes") or []:
                by_hash[str(hashed)] = tenant
        self.enforce = bool(policy.get("enforce", True))
        self._by_hash, self.shared, self._mtime = by_hash, frozenset(policy.get("shared") or ()), mtime
        log.info("loaded %d tenants (%d keys) from %s", len({t.name for t in by_hash.values()}), len(by_hash), self.path)

    def _try_reload(self) -> None:
        try:
            self._reload()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a file being replaced, or a bad edit: keep the policy we had
            log.warning("tenant policy unreadable (%s); keeping the previous one", exc)

    def tenant_for(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key this is. Looked up by the key's hash: a lookup that takes as long for every key
        cannot tell an attacker how close a guess came."""
        token = bearer_token(authorization) if authorization else None
        return self._by_hash.get(key_hash(token)) if token else None

    def refusal(self, tenant: Tenant, requested: str | None, now: float) -> tuple[int, str, str, float] | None:
        """(status, message, error type, Retry-After s) when ``tenant`` may not make this request now; else None, and
        the request is admitted (counted in flight until ``tenant.done()``). ``requested``: the gateway's routing key."""
        asked = None if requested is None else ring.merged_ids(requested) or [requested]
        if not tenant.may_call(asked, self.shared):
            # As an unknown adapter reads: whether another tenant's adapter exists is not this caller's to learn.
            what = f"adapter {requested!r}" if requested is not None else "the base model"
            return 404, f"{what} not found", "not_found", 0.0
        over = tenant.admit(now)
        if over is not None:
            limit, wait = over
            return 429, f"tenant {tenant.name!r} is over its limit {limit} (this gateway's share); retry after {math.ceil(wait)} s", "overloaded", wait
        return None

    def visible(self, tenant: Tenant, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The catalogue entries a tenant may call (what its GET /v1/models lists)."""
        return [e for e in entries if e.get("name") in tenant.adapters or e.get("name") in self.shared]
