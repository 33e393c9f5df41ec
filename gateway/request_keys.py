"""What the gateway reads from a request body to route it: the adapter (its ring key) and, for prefix routing, the
prompt's start. The body is parsed once; everything else about it is the replica's to check."""

from __future__ import annotations

import json

from lorafleet import ring

TGI_ROUTES = {"/", "/generate", "/generate_stream"}


def request_payload(path: str, body: bytes) -> dict | None:
    """The JSON object of a generate request (TGI or OpenAI routes), parsed once for everything routing reads;
    None for other routes and for bodies that are not a JSON object (the replica says why)."""
    if not body or not (path in TGI_ROUTES or path.startswith("/v1/")):
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
        return None
    return payload if isinstance(payload, dict) else None


def routing_key(path: str, payload: dict | None, base_model_ids: set[str]) -> str | None:
    """The adapter a request is for (None: the base model, any replica)."""
    if payload is None:
        return None
    if path.startswith("/v1/"):
        model = payload.get("model")
        return _hashable(model) if isinstance(model, str) and model and model not in base_model_ids else None
    parameters = payload.get("parameters")
    if not isinstance(parameters, dict):
        return None
    adapter = parameters.get("adapter_id")
    if isinstance(adapter, str) and adapter:
        return _hashable(adapter)
    merged = parameters.get("merged_adapters")
    if isinstance(merged, dict) and isinstance(merged.get("ids"), list):
        return _hashable(ring.merged_key([str(i) for i in merged["ids"]]))
    return None


def prompt_start(path: str, payload: dict | None, chars: int) -> str | None:
    """The first ``chars`` characters of the prompt (TGI ``inputs``, OpenAI ``prompt`` or the chat messages),
    for --prefix-chars routing; None when the body has none."""
    if payload is None:
        return None
    if path in TGI_ROUTES:
        text = payload.get("inputs")
    elif path == "/v1/completions":
        text = payload.get("prompt")
        text = text[0] if isinstance(text, list) and text else text
    else:
        messages = payload.get("messages")
        text = json.dumps(messages, ensure_ascii=False, separators=(",", ":"))[: chars + 64] if isinstance(messages, list) else None
    return _hashable(text[:chars]) if isinstance(text, str) and text else None


def _hashable(key: str) -> str | None:
    """A key the ring can hash: a lone surrogate (valid JSON, invalid Unicode) routes as no adapter; the replica refuses it."""
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return key
