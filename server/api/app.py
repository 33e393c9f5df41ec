"""The replica's FastAPI application: routes, the body-size limit, and request metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet import __version__
from lorafleet.http_limits import head_too_large
from lorafleet.server.api import admin, openai, tgi
from lorafleet.server.api.catalogue import MAX_CATALOGUE_BODY_BYTES
from lorafleet.server.api.deps import Service
from lorafleet.server.api.errors import HANDLED
from lorafleet.server.api.http_common import error_response, read_json_object
from lorafleet.server.api.memory import memory_bytes
from lorafleet.server.api.request_spans import start_request_span
from lorafleet.server.api.service import ReplicaService
from lorafleet.server.errors import RequestError

METRICS_WAIT_S = 10.0  # a scrape waits at most this for the engine thread (one step, normally milliseconds)
GENERATE_ROUTES = {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions"}


class BodyLimit:
    """Refuse a head over MAX_HEAD_BYTES with 431, and a body over ``limit`` bytes with 413 before reading
    it whole (Content-Length or while streaming in)."""

    def __init__(self, app: ASGIApp, limit: int, route_limits: dict[tuple[str, str], int] | None = None) -> None:
        self.app = app
        self.limit = limit
        self.route_limits = route_limits or {}  # (method, path) -> its own limit (the catalogue's, sized to its entries)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = head_too_large(scope)
        if too_large is not None:
            return await self._refuse(send, 431, too_large)
        limit = self.route_limits.get((scope["method"], scope["path"]), self.limit)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await self._refuse(send, 413, f"the request body is larger than {limit} bytes")
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(f"the request body is larger than {limit} bytes")
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge as exc:
            await self._refuse(send, 413, str(exc))

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        body = JSONResponse({"error": message, "error_type": "validation"}, status_code=status)
        await send({"type": "http.response.start", "status": status, "headers": body.raw_headers})
        await send({"type": "http.response.body", "body": body.body})


class _TooLarge(RequestError):
    """Raised from ``receive`` mid-body: a route that catches it answers 413 through its own error path."""

    status, error_type = 413, "validation"


class RequestMetrics:
    """Counts and times requests by route, status and adapter (pure ASGI, so streams and disconnects pass untouched)."""

    def __init__(self, app: ASGIApp, service: ReplicaService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        seen: dict[str, str] = {}
        state = scope.setdefault("state", {})  # the routes note the version a request named there (request.state)
        tracing = self.service.tracing
        span = start_request_span(tracing, scope) if tracing is not None and scope["path"] in GENERATE_ROUTES else None

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start":
                seen["status"] = str(message["status"])
                headers = dict(message.get("headers", []))
                seen["adapter"], seen["name"] = headers.get(b"x-adapter-id", b"").decode(), headers.get(b"x-adapter-name", b"").decode()
            await send(message)

        try:
            await self.app(scope, receive, watching)
        finally:
            if span is not None:
                span.set_attribute("http.response.status_code", int(seen.get("status", "499")))
                span.end()
            route = scope["path"] if scope["path"] in GENERATE_ROUTES else "other"
            metrics = self.service.metrics
            status = seen.get("status", "499")
            job = state.get("job")  # the validated request, when it got that far
            named = job.adapter.ring_key if job is not None and job.adapter is not None else ""
            # x-adapter-id is set only on an answer that used the adapter, so the label is never an arbitrary request
            # string; a 424 (the adapter ran, no usable token came out) used it too, and is its error, not the base model's.
            ran = named if status == "424" else ""
            name = seen.get("name") or (job.name if ran and job is not None else None)
            metrics.requests.labels(route, status, *metrics.labels(name, seen.get("adapter") or ran)).inc()
            late = job is not None and job.failed_late  # a stream that began 200 and ended in an error event
            metrics.versions.answered(seen.get("adapter") or named, 500 if late else int(seen.get("status", "499")))
            metrics.duration.labels(route).observe(time.perf_counter() - started)


async def request_error(_: Request, exc: Exception) -> JSONResponse:
    """The one place an error becomes a response: routes raise, ``classify`` says the status."""
    return error_response(exc)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Unknown routes and methods answer in the API's error shape too (clients parse one shape)."""
    kind = {404: "not_found", 405: "validation"}.get(exc.status_code, "validation")
    return JSONResponse({"error": str(exc.detail), "error_type": kind}, status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def schema_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": str(exc.errors()), "error_type": "validation"}, status_code=422)


router = APIRouter()


@router.get("/health", summary="200 when the engine can serve, 503 otherwise")
async def health(service: Service) -> Response:
    if service.healthy:
        return Response(status_code=200)
    reason = "shutting down" if service.draining else (service.runner.last_error or "not ready")
    return JSONResponse({"error": reason, "error_type": "unhealthy"}, status_code=503)


@router.get("/info", summary="model and limits")
async def info(service: Service) -> dict:
    return {**service.info(), "memory": await service.runner.call(lambda: memory_bytes(service.engine))}


@router.get("/metrics", summary="Prometheus text")
async def metrics(service: Service) -> Response:
    try:  # the engine thread reads its own state between steps (slots and states change under any other reader)
        snapshot = await asyncio.wait_for(service.runner.call(service.snapshot), METRICS_WAIT_S)
    except TimeoutError:
        return JSONResponse({"error": f"the engine did not answer within {METRICS_WAIT_S:g}s", "error_type": "unhealthy"}, status_code=503)
    return Response(service.metrics.render(snapshot), media_type="text/plain; version=0.0.4")


@router.post("/tokenize", summary="tokens of an input, with character offsets")
async def tokenize(service: Service, request: Request) -> Any:
    body = await read_json_object(request)
    if not isinstance(body.get("inputs"), str):
        raise RequestError("`inputs` must be a string")
    special = body.get("add_special_tokens", True)
    if not isinstance(special, bool):
        raise RequestError("`add_special_tokens` must be true or false")
    encoded = service.tokenizer(body["inputs"], add_special_tokens=special, return_offsets_mapping=True)
    text = body["inputs"]
    return [{"id": token, "text": text[start:stop], "start": start, "stop": stop} for token, (start, stop) in zip(encoded.input_ids, encoded.offset_mapping)]


def create_app(service: ReplicaService) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not service.started:
            service.start()
        await service.preload()
        yield
        service.stop()

    app = FastAPI(title="lorafleet replica", version=__version__, lifespan=lifespan)
    app.add_middleware(BodyLimit, limit=service.config.max_body_bytes,
                       route_limits={("PUT", "/adapters/catalogue"): max(MAX_CATALOGUE_BODY_BYTES, service.config.max_body_bytes)})
    app.add_middleware(RequestMetrics, service=service)
    for family in HANDLED:
        app.add_exception_handler(family, request_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, schema_error)
    app.state.service = service  # the routers' dependency (server/api/deps.py)
    for routes in (router, tgi.router, openai.router, admin.router):
        app.include_router(routes)
    return app
