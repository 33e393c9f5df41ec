"""Bearer credentials, read and compared one way in every process: the gateway's API keys, a replica's admin and
warm tokens, the operator's and the gateways' calls to replicas. Comparisons take constant time, so a caller cannot
learn a token a byte at a time from how long a refusal takes."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header (the scheme in any case), or None."""
    if not authorization or not authorization[:7].lower() == "bearer ":
        return None
    return authorization[7:].strip() or None


def offered_one_of(authorization: str | None, expected: Iterable[str | bytes | None]) -> bool:
    """The header carries one of ``expected`` (Nones skipped); each compared in constant time."""
    offered = (bearer_token(authorization) or "").encode("utf-8", "surrogateescape")
    if not offered:
        return False
    return any(hmac.compare_digest(offered, token if isinstance(token, bytes) else token.encode()) for token in expected if token is not None)


def authorization(token: str | None) -> dict[str, str]:
    """The header that offers ``token`` (none without one)."""
    return {"authorization": f"Bearer {token}"} if token else {}


def key_hash(key: str) -> str:
    """How a tenant policy names an API key (the operator writes it, the gateway looks keys up by it): ``sha256:<hex>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
