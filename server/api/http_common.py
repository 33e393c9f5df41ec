"""What every route shares: reading a JSON body, error responses, SSE framing, disconnect handling."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import JSONResponse

from lorafleet.server.api.json_guard import MAX_DEPTH, UnusableValue, check_values
from lorafleet.server.errors import RequestError, classify

T = TypeVar("T")
KEEPALIVE_S = 15.0


async def read_json(request: Request) -> Any:
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if content_type not in ("application/json", ""):
        raise RequestError(f"Content-Type must be application/json, got {content_type!r}", 415, "validation")
    raw = await request.body()
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


def sse(data: Any) -> str:
    return f"data:{json.dumps(data, ensure_ascii=False)}\n\n"


def bearer_token(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value[7:].strip() or None if value.lower().startswith("bearer ") else None


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
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


async def next_or_keepalive(events: Any, pending: dict) -> Any:
    """The next event, or None when KEEPALIVE_S pass without one (the caller sends a comment line)."""
    task = pending.get("task")
    if task is None:
        task = pending["task"] = asyncio.ensure_future(events.__anext__())
    done, _ = await asyncio.wait({task}, timeout=KEEPALIVE_S)
    if not done:
        return None
    pending.pop("task")
    return task.result()


async def close_events(events: Any, pending: asyncio.Future | None = None) -> None:
    """Close a generation's event stream (which cancels it in the engine if it is still running)."""
    if pending is not None and not pending.done():
        pending.cancel()
        try:
            await pending
        except BaseException:  # noqa: BLE001 - the cancellation we asked for, or the stream's own end
            pass
    try:
        await events.aclose()
    except RuntimeError:  # already closing on another path
        pass
