"""The fleet's registered adapters as the gateway knows them: name -> the key the ring places it by.

The operator keeps every replica's catalogue equal to the BaseModel's Adapter resources
(``PUT /adapters/catalogue``); the gateway reads it from one replica per probe round with
``If-None-Match``, so an unchanged catalogue of a thousand adapters costs a 304. A request naming
a registered adapter is routed by the adapter's id — the key the operator placed it by — and the
replica resolves the name itself; unregistered ids route by themselves, as before.

A name being rolled out has a canary (lorafleet/traffic_split.py): ``choose`` draws each request's side, by the
caller's sticky identity when the rollout asks for one, and the request is routed by the chosen version's key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import httpx

from lorafleet.adapter_ref import AdapterRef
from lorafleet.traffic_split import Split, version_header

log = logging.getLogger(__name__)


class Catalogue:
    def __init__(self) -> None:
        self.keys: dict[str, str] = {}  # registered name -> ring key
        self.splits: dict[str, Split] = {}  # registered name -> its canary and the canary's share, during a rollout
        self.owners: dict[str, int] = {}  # registered name -> ring owners its demand has it on, when more than one
        self.headers: dict[str, tuple[bytes, bytes | None]] = {}  # name -> VARIANT_HEADER values (stable, canary), made once
        self.entries: list[dict[str, Any]] = []
        self.base: str | None = None  # the base model's name, as the replicas serve it
        self.version: str | None = None

    def spread(self, requested: str | None) -> int:
        """Over how many of its first ring owners a name's requests go (1: the bounded-load pick, as for any id)."""
        return self.owners.get(requested, 1) if requested is not None else 1

    def key_for(self, requested: str | None) -> str | None:
        return self.keys.get(requested, requested) if requested is not None else None

    def choose(self, requested: str | None, identity: Callable[[Split], str | None]) -> tuple[str | None, bytes | None]:
        """(the ring key to route by, the ``VARIANT_HEADER`` value naming that version when ``requested`` is a registered
        name); ``identity`` gives the caller's sticky identity for a split (its API key or a header's value), or None."""
        headers = self.headers.get(requested) if requested is not None else None
        if headers is None:
            return self.key_for(requested), None
        split = self.splits.get(requested)
        if split is not None and split.takes(requested, identity(split)):
            return split.canary.ring_key, headers[1]
        return self.keys[requested], headers[0]

    async def refresh(self, client: httpx.AsyncClient, url: str) -> None:
        """Read the catalogue from the replica at ``url`` if it changed; a replica without one leaves ours as it is."""
        headers = {"if-none-match": f'"{self.version}"'} if self.version else {}
        try:
            response = await client.get(url + "/adapters/catalogue", headers=headers, timeout=2.0)
            if response.status_code != 200:
                return
            body = response.json()
            if not isinstance(body, dict) or not isinstance(body.get("adapters"), list):
                return
            entries = [e for e in body["adapters"] if isinstance(e, dict) and isinstance(e.get("name"), str)]
            refs = {e["name"]: AdapterRef.from_entry(e) for e in entries}
            keys = {name: ref.ring_key for name, ref in refs.items()}  # the key the operator placed it by
            splits = {e["name"]: split for e in entries if (split := Split.from_entry(e.get("canary"))) is not None}
            owners = {e["name"]: e["owners"] for e in entries if isinstance(e.get("owners"), int) and e["owners"] > 1}
            headers = {name: (version_header(ref), version_header(splits[name].canary) if name in splits else None) for name, ref in refs.items()}
        except (httpx.HTTPError, ValueError, TypeError, KeyError):
            return
        self.entries, self.keys, self.splits, self.headers, self.owners = entries, keys, splits, headers, owners
        self.base, self.version = body.get("base") or self.base, body.get("version")
        log.info("catalogue %s: %d registered adapters", self.version, len(entries))

    def models(self, base: str | None, created: int, entries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        """``GET /v1/models``: the base model once (unless ``base`` is None: a tenant without it), then each registered
        adapter once (of ``entries`` when given: a tenant's), with its parent."""
        name = base
        data = [{"id": name, "object": "model", "created": created, "owned_by": "lorafleet", "root": name, "parent": None}] if name else []
        parent = base or self.base
        data += [{"id": e["name"], "object": "model", "created": created, "owned_by": "lorafleet", "root": e["id"], "parent": parent}
                 for e in (self.entries if entries is None else entries)]
        return {"object": "list", "data": data}
