"""Tenants at the gateway: whose key it is, which adapters it may call, and how much (issue 32, the gateway's half).

A policy file (JSON, re-read when it changes) lists tenants by the SHA-256 of their API keys, never the keys
themselves, so the file (a Secret the operator will render from Tenant resources; not built yet) can be read without
handing out credentials. A key that hashes to no tenant is a 401. A tenant may call the registered names it lists
and the fleet's shared ones, and the base model when ``base`` is true; anything else is a 404 that reads like an
unknown adapter's (the gateway does not confirm another tenant's adapter exists). Limits: requests per minute (a
token bucket) and concurrent requests; over one, a 429 with Retry-After that names the limit.

Several gateways: each enforces ``limit / gateways`` (``--tenant-gateways``, set to the gateway Deployment's
replicas), so the fleet-wide rate holds when the Service spreads a tenant's connections evenly, and exceeds the
limit by nothing; with one caller pinned to one gateway by a kept-alive connection the tenant gets at most 1/N of
its limit through it. Shared counters would be exact and cost a round trip per request; the split costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafleet import ring
from lorafleet.bearer import bearer_token
from lorafleet.token_bucket import TokenBucket

log = logging.getLogger(__name__)


def key_hash(key: str) -> str:
    """How a policy file names a key: ``sha256:<hex>`` of the bearer token."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass
class Tenant:
    name: str
    adapters: frozenset[str]
    base: bool
    requests_per_minute: float | None
    concurrent: int | None
    in_flight: int = 0
    requests: TokenBucket | None = field(default=None, repr=False)  # requests_per_minute's bucket, a minute's worth deep

    def __post_init__(self) -> None:
        if self.requests_per_minute is not None and self.requests is None:
            self.requests = TokenBucket(self.requests_per_minute / 60.0, max(1.0, self.requests_per_minute))

    def may_call(self, adapters: list[str] | None, shared: frozenset[str]) -> bool:
        """``adapters``: the registered names a request asks for (None: the base model)."""
        if adapters is None:
            return self.base
        return all(a in self.adapters or a in shared for a in adapters)

    def admit(self, now: float) -> tuple[str, float] | None:
        """None when the request may start (it is counted); else (the limit it is over, seconds until it fits)."""
        if self.concurrent is not None and self.in_flight >= self.concurrent:
            return f"concurrentRequests {self.concurrent}", 1.0
        if self.requests is not None and (wait := self.requests.take(now)):
            return f"requestsPerMinute {self.requests_per_minute:g}", wait
        self.in_flight += 1
        return None

    def done(self) -> None:
        self.in_flight -= 1


class Tenants:
    """The policy file's tenants by key hash; ``active`` is False without a file (every key, every adapter)."""

    def __init__(self, path: Path | None, gateways: int = 1) -> None:
        self.path, self.gateways = path, max(1, gateways)
        self.shared: frozenset[str] = frozenset()
        self._by_hash: dict[str, Tenant] = {}
        self._mtime: float | None = None
        if path is not None:
            self._reload()

    @property
    def active(self) -> bool:
        return self.path is not None

    def _reload(self) -> None:
        assert self.path is not None
        mtime = os.stat(self.path).st_mtime
        if mtime == self._mtime:
            return
        policy = json.loads(self.path.read_text())
        previous = {t.name: t for t in self._by_hash.values()}
        by_hash: dict[str, Tenant] = {}
        for entry in policy.get("tenants") or []:
            limits = entry.get("limits") or {}
            rpm, concurrent = limits.get("requestsPerMinute"), limits.get("concurrentRequests")
            tenant = Tenant(str(entry["name"]), frozenset(entry.get("adapters") or ()), bool(entry.get("base", False)),
                            rpm / self.gateways if rpm is not None else None,
                            max(1, math.ceil(concurrent / self.gateways)) if concurrent is not None else None)
            old = previous.get(tenant.name)
            if old is not None:  # a reload (a rotated key) keeps what is in flight and what was spent
                tenant.in_flight = old.in_flight
                if tenant.requests is not None and old.requests is not None:
                    tenant.requests.continue_from(old.requests)
            for hashed in entry.get("keyHashes") or []:
                by_hash[str(hashed)] = tenant
        self._by_hash, self.shared, self._mtime = by_hash, frozenset(policy.get("shared") or ()), mtime
        log.info("loaded %d tenants (%d keys) from %s", len({t.name for t in by_hash.values()}), len(by_hash), self.path)

    def tenant_for(self, authorization: str | None) -> Tenant | None:
        """The tenant whose key this is. Looked up by the key's hash: a lookup that takes as long for every key
        cannot tell an attacker how close a guess came."""
        try:
            self._reload()
        except (OSError, ValueError, KeyError, TypeError) as exc:  # a file being replaced, or a bad edit: keep the policy we had
            log.warning("tenant policy unreadable (%s); keeping the previous one", exc)
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
