"""The one SSE loop of both APIs: events out as the engine makes them, keep-alives, metrics, cleanup.

TGI and OpenAI streams differ only in how an event is written; everything else — a ``:`` comment
every KEEPALIVE_S without an event (it keeps idle proxies open, and writing it is how a stream
learns that its client left), the time-to-first-token and per-token metrics, an error as the last
event rather than a cut connection, releasing the request's place and cancelling its generation
however the stream ends — is written once, here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

from lorafleet.server.api.errors import classify
from lorafleet.server.engine.async_engine import TokenEvent
from lorafleet.usage_line import usage_comment

KEEPALIVE_S = 15.0


def sse(data: Any) -> str:
    return f"data:{json.dumps(data, ensure_ascii=False)}\n\n"


async def sse_events(service: Any, job: Any, first: TokenEvent, events: AsyncIterator[TokenEvent], started: float,
                     render: Callable[[TokenEvent], Iterable[str]], prelude: Iterable[str] = (), epilogue: Iterable[str] = ()) -> AsyncIterator[str]:
    """SSE lines for one generation: ``prelude``, ``render(event)`` for each event, then ``epilogue``.

    ``service`` is the ReplicaService that admitted the request (its place is released here);
    ``started`` is when the request was admitted, for the time to the first token.
    """
    first_at = time.perf_counter()
    pending: dict = {}
    try:
        for line in prelude:
            yield line
        event = first
        while True:
            for line in render(event):
                yield line
            if event.finished:
                if event.seq is not None:
                    service.observe(job, event.seq, first_at - started, time.perf_counter() - first_at)
                    yield usage_comment(len(event.seq.tokens))  # for the gateway's per-tenant token count
                break
            try:
                while (event := await next_or_keepalive(events, pending)) is None:
                    yield ":\n\n"
            except StopAsyncIteration:
                break
        for line in epilogue:
            yield line
    except Exception as exc:  # once streaming, an error is the last event, never a broken connection
        _, error_type, message = classify(exc)
        job.failed_late = True
        yield sse({"error": message, "error_type": error_type})
    finally:
        service.release()
        await close_events(events, pending.get("task"))


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
