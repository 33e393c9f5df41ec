"""The registered adapters a replica was given (PUT /adapters/catalogue), as one immutable snapshot.

Gateways poll it every probe round and most answers are 304s, so its digest and its JSON are computed once, when
it changes, never per read (40 reads of a 20,000-entry catalogue held a 2-token generate at 4.1 s when each read
hashed it again on the event loop). Its limits agree: the largest catalogue admitted fits the body limit of its route.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from lorafleet.adapter_ref import AdapterRef, catalogue_entries, catalogue_version
from lorafleet.adapter_rules import MAX_ID_LENGTH, MAX_REVISION_LENGTH
from lorafleet.traffic_split import Split

MAX_CATALOGUE = 100_000
MAX_NAME_LENGTH = 317  # an Adapter's "namespace/name": 63 + 1 + 253
# Every admitted entry serialises to at most this much JSON (the longest name, id and revision, keys and quotes), so the
# body limit of PUT /adapters/catalogue admits exactly the largest catalogue the route accepts.
MAX_ENTRY_BYTES = MAX_NAME_LENGTH + MAX_ID_LENGTH + MAX_REVISION_LENGTH + 96  # + `"owners": 1000`
MAX_OWNERS = 1000  # ring owners a hot adapter may be spread over (a BaseModel's replicas at most)
# Names with a canary at once (rollouts under way); each canary adds its version, weight, stickiness and header.
MAX_CANARIES = 1000
MAX_CANARY_BYTES = MAX_ID_LENGTH + MAX_REVISION_LENGTH + 128 + 160
MAX_CATALOGUE_BODY_BYTES = MAX_CATALOGUE * MAX_ENTRY_BYTES + MAX_CANARIES * MAX_CANARY_BYTES + 4096


@dataclass(frozen=True, slots=True)
class Catalogue:
    refs: dict[str, AdapterRef]
    version: str
    body: bytes  # the GET answer, made once

    @classmethod
    def of(cls, refs: dict[str, AdapterRef], base: str, splits: dict[str, Split] | None = None, owners: dict[str, int] | None = None) -> Catalogue:
        listed = catalogue_entries(refs, {name: split.entry() for name, split in (splits or {}).items()}, owners)
        version = catalogue_version(listed)
        return cls(refs, version, json.dumps({"version": version, "base": base, "adapters": listed}).encode())
