"""One identity for an adapter version, spelled once for the replica, the gateway and the operator. Torch-free.

An adapter is ``(source, id, revision)``. Every process derives its names from that triple here and nowhere else:

- ``key`` (``source:id@revision``) names it on a replica: the tiers, the device slots, ``GET /adapters``, unloads;
- ``ring_key`` (``id@revision``) is what the consistent-hash ring places: the operator warms the owners of this key
  and the gateway routes a request to the owners of this key, so the two agree by construction (they once used
  ``id`` and ``id@revision`` respectively, and a revision-pinned Adapter was warmed on the wrong replica);
- ``entry(name)`` / ``from_entry`` is the catalogue's wire shape, and ``catalogue_version`` its digest;
- ``load_body`` is what the operator and a gateway's hand-off send to ``POST /adapters``.

The revision travels as its own field. A hub id may also carry it (``org/name@v2``, as LoRAX accepts); a local
path or an S3 prefix never does, so a local Adapter with ``spec.revision`` still names its folder exactly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lorafleet.adapter_rules import MAX_ID_LENGTH, MAX_REVISION_LENGTH

SOURCES = ("hub", "local", "s3")


@dataclass(frozen=True, slots=True)
class AdapterRef:
    source: str
    id: str
    revision: str | None = None

    @property
    def key(self) -> str:
        """One name per adapter version on a replica: every tier and the engine's slots use it."""
        return f"{self.source}:{self.ring_key}"

    @property
    def ring_key(self) -> str:
        """What the ring places: the operator warms, and the gateway routes to, the owners of this key."""
        return self.id + (f"@{self.revision}" if self.revision else "")

    @classmethod
    def parse(cls, adapter_id: str, source: str, revision: str | None = None) -> AdapterRef:
        """A reference from a request's fields; ValueError (a 4xx to the caller) says what is wrong with it."""
        if source not in SOURCES:
            raise ValueError(f"adapter_source must be one of {', '.join(SOURCES)}, got {source!r}")
        if not isinstance(adapter_id, str):
            raise ValueError(f"adapter_id must be a string, got {adapter_id!r}")
        if not adapter_id.strip():
            raise ValueError("adapter_id must not be empty")
        if len(adapter_id) > MAX_ID_LENGTH:
            raise ValueError(f"adapter_id is {len(adapter_id)} characters; at most {MAX_ID_LENGTH} are accepted")
        if revision is not None and (not isinstance(revision, str) or not revision or len(revision) > MAX_REVISION_LENGTH):
            raise ValueError(f"revision must be a non-empty string of at most {MAX_REVISION_LENGTH} characters")
        if source == "hub" and "@" in adapter_id:
            adapter_id, in_id = adapter_id.rsplit("@", 1)
            if revision is not None and revision != in_id:
                raise ValueError(f"adapter_id names revision {in_id!r} and revision says {revision!r}; give one")
            revision = in_id or None
        if source == "s3" and not adapter_id.startswith("s3://"):
            raise ValueError(f"an s3 adapter_id must look like s3://bucket/prefix, got {adapter_id!r}")
        return cls(source, adapter_id, revision)

    def fields(self) -> dict[str, Any]:
        """The version as JSON fields: what a catalogue entry, its canary and the gateway's version header carry."""
        return {"id": self.id, "source": self.source, "revision": self.revision}

    def entry(self, name: str) -> dict[str, Any]:
        """This adapter registered under ``name``: one entry of the catalogue the operator shares."""
        return {"name": name, **self.fields()}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> AdapterRef:
        """The reference a catalogue entry or a replica's listing row names (ValueError when it names none)."""
        return cls.parse(entry.get("id"), entry.get("source") or "hub", entry.get("revision") or None)

    def load_body(self, pin: bool = False) -> dict[str, Any]:
        """The body of ``POST /adapters`` (and ``/adapters/warm``) that loads exactly this version."""
        body: dict[str, Any] = {"adapter_id": self.id, "adapter_source": self.source, "pin": pin}
        if self.revision:
            body["revision"] = self.revision
        return body


def catalogue_entries(named: Mapping[str, AdapterRef], canaries: Mapping[str, dict[str, Any]] | None = None,
                      owners: Mapping[str, int] | None = None) -> list[dict[str, Any]]:
    """The catalogue's wire shape, ordered by name so equal catalogues have equal digests; a name being rolled out
    carries its canary (``traffic_split.Split.entry``) beside its stable version, and a hot adapter the ring owners
    its demand has it on (operator/adapter_demand.py), over which gateways spread its requests."""
    canaries, owners = canaries or {}, owners or {}
    return [ref.entry(name) | ({"canary": canaries[name]} if name in canaries else {}) | ({"owners": owners[name]} if owners.get(name, 1) > 1 else {})
            for name, ref in sorted(named.items())]


def catalogue_version(entries: list[dict[str, Any]]) -> str:
    """The digest the gateway's If-None-Match and the operator's "already sent" both compare."""
    return hashlib.blake2b(json.dumps(entries).encode(), digest_size=8).hexdigest()
