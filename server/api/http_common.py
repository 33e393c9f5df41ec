"""What every route shares: reading a JSON body, error responses, the bearer credential, disconnect handling."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from lorafleet.cache_salt import HOP_TOKEN_HEADER, MAX_SALT_LENGTH, SALT_HEADER
from lorafleet.server.api.errors import classify
from lorafleet.server.api.json_guard import MAX_DEPTH, UnusableValue, check_values
from lorafleet.server.errors import ClientGone, RequestError
from lorafleet.traffic_split import VARIANT_HEADER

T = TypeVar("T")


async def read_json(request: Request) -> Any:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise RequestError(f"Content-Type must be application/json, got {content_type!r}", 415, "validation")
    try:
        raw = await request.body()
    except ClientDisconnect:  # it hung up mid-body (a gateway's timeout while this replica was stopped): a 499, not a 500
        raise ClientGone("the client closed the connection before its request body arrived") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not valid UTF-8 (byte {exc.start})", 400, "validation") from exc
    try:
        body = json.loads(text)
    except RecursionError:
        raise RequestError(f"the request body is nested deeper than {MAX_DEPTH} levels", 400, "validation") from None
    except ValueError as exc:
        raise RequestError(f"the request body is not valid JSON: {exc}", 400, "validation") from exc
    try:
        check_values(body)
    except UnusableValue as exc:
        raise RequestError(str(exc), 422, "validation") from None
    return body


async def read_json_object(request: Request) -> dict:
    body = await read_json(request)
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def error_response(exc: BaseException, headers: dict[str, str] | None = None) -> JSONResponse:
    status, error_type, message = classify(exc)
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status, headers=headers)


def adapter_headers(job: Any, tier: str) -> dict[str, str]:
    """Which adapter version served the request, under which registered name, and where it was found on arrival:
    the replica's per-adapter metrics and the gateway's read them (OpenAI and TGI routes alike)."""
    headers = {"x-adapter-id": job.adapter.ring_key if job.adapter else "", "x-adapter-tier": tier}
    if job.name is not None:
        headers["x-adapter-name"] = job.name
    return headers


def chosen_version(request: Request) -> dict[str, Any] | None:
    """The version of a registered name the gateway routed this request by, or None. Not a credential:
    a caller who reaches the replica directly can name that version by its id, and gateways drop a client's copy."""
    value = request.headers.get(VARIANT_HEADER)
    if value is None:
        return None
    try:
        chosen = json.loads(value)
    except ValueError:
        chosen = None
    if not isinstance(chosen, dict):
        raise RequestError(f"{VARIANT_HEADER} must be a JSON object naming an adapter version (id, source, revision)", 400, "validation")
    return chosen


def trusted_cache_salt(request: Request, hop_token: str | None) -> bytes:
    """The request's prefix-cache salt when a trusted hop (the gateway, holding ``hop_token``) set it; else none:
    a caller's own salt header reaching the replica some other way is ignored (lorafleet/cache_salt.py)."""
    salt, offered = request.headers.get(SALT_HEADER), request.headers.get(HOP_TOKEN_HEADER)
    if not salt or not offered or hop_token is None or len(salt) > MAX_SALT_LENGTH:
        return b""
    if not hmac.compare_digest(offered.encode("utf-8", "surrogateescape"), hop_token.encode()):
        return b""
    return hashlib.blake2b(salt.encode("utf-8", "surrogateescape"), digest_size=16).digest()


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client goes away first (which cancels its generation)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.25)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise ClientGone("the client closed the connection before its answer")
    finally:
        if not task.done():
            task.cancel()
