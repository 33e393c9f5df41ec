"""The registered adapters a replica was given (PUT /adapters/catalogue), as one immutable snapshot.

Gateways poll it every probe round and most answers are 304s, so its digest and its JSON are computed once, when
it changes, never per read (40 reads of a 20,000-entry catalogue held a 2-token generate at 4.1 s when each read
hashed it again on the event loop). Its limits agree: the largest catalogue admitted fits the body limit of its route.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from lorafleet.adapter_rules import MAX_ID_LENGTH, MAX_REVISION_LENGTH
from lorafleet.server.adapters.sources import AdapterRef

MAX_CATALOGUE = 100_000
MAX_NAME_LENGTH = 317  # an Adapter's "namespace/name": 63 + 1 + 253
# Every admitted entry serialises to at most this much JSON (the longest name, id and revision, keys and quotes), so the
# body limit of PUT /adapters/catalogue admits exactly the largest catalogue the route accepts.
MAX_ENTRY_BYTES = MAX_NAME_LENGTH + MAX_ID_LENGTH + MAX_REVISION_LENGTH + 80
MAX_CATALOGUE_BODY_BYTES = MAX_CATALOGUE * MAX_ENTRY_BYTES + 4096


def entries(refs: dict[str, AdapterRef]) -> list[dict[str, Any]]:
    return [{"name": name, "id": ref.id, "source": ref.source, "revision": ref.revision} for name, ref in sorted(refs.items())]


@dataclass(frozen=True, slots=True)
class Catalogue:
    refs: dict[str, AdapterRef]
    version: str
    body: bytes  # the GET answer, made once

    @classmethod
    def of(cls, refs: dict[str, AdapterRef], base: str) -> Catalogue:
        listed = entries(refs)
        version = hashlib.blake2b(json.dumps(listed).encode(), digest_size=8).hexdigest()
        return cls(refs, version, json.dumps({"version": version, "base": base, "adapters": listed}).encode())
