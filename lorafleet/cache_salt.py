"""Who shares prefix-cache blocks with whom: the per-request cache salt, set by a trusted hop only.

A prefix cache is an oracle: a request whose prompt starts like another caller's gets its first token fast (0.09 s
for a right guess of another client's prompt vs 1.8 s for a wrong one, seen here; vLLM's CVE-2025-46570). Blocks
are therefore keyed by a salt as well as by adapter and tokens, and only requests with the same salt share them.
The salt comes from the gateway, never from the caller (as vllm#53347 says of vLLM's ``cache_salt``): the gateway
strips both headers from every client request and sets them itself, and a replica honours the salt only when the
hop token beside it is its warm token, the gateway's credential. Who shares: requests through a gateway under the
same API key; requests without keys or straight to a replica share the unsalted cache.
"""

from __future__ import annotations

import hashlib

SALT_HEADER = "x-lorafleet-cache-salt"
HOP_TOKEN_HEADER = "x-lorafleet-hop-token"
MAX_SALT_LENGTH = 128


def salt_for_key(api_key: str) -> str:
    """The gateway's salt for a caller: a digest of its API key (never the key itself, which stays at the gateway)."""
    return hashlib.blake2b(api_key.encode("utf-8", "surrogateescape"), digest_size=16, person=b"lorafleet-salt").hexdigest()
