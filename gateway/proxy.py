"""The gateway's request path: read the body once, pick the replica, proxy bytes, fail over.

Only ``parameters.adapter_id`` (TGI/LoRAX routes) or ``model`` (OpenAI routes) is read from the
body; the bytes and headers go upstream untouched, and the response streams back chunk by chunk
as the replica writes it (SSE events are not buffered). A connection error, a timeout before the
response starts, or a 503 sends the request to the next owner; once a response has started it is
never replayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from lorafleet import ring
from lorafleet.gateway.auth import ApiKeys
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.replicas import Replica, ReplicaSet

log = logging.getLogger(__name__)
TGI_ROUTES = {"/", "/generate", "/generate_stream"}
HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
BUFFER_LIMIT = 1 << 20  # sized responses up to this are read whole rather than relayed
RETRYABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError, httpx.PoolTimeout)


def error(status: int, message: str, error_type: str) -> JSONResponse:
    return JSONResponse({"error": message, "error_type": error_type}, status_code=status)


async def until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work`` unless the client disconnects first, in which case it is cancelled."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


def routing_key(path: str, body: bytes, base_model_ids: set[str]) -> str | None:
    """The adapter a request is for (None: the base model, any replica)."""
    if not body or not (path in TGI_ROUTES or path.startswith("/v1/")):
        return None
    try:
        payload = json.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict):
        return None
    if path.startswith("/v1/"):
        model = payload.get("model")
        return model if isinstance(model, str) and model and model not in base_model_ids else None
    parameters = payload.get("parameters")
    if not isinstance(parameters, dict):
        return None
    adapter = parameters.get("adapter_id")
    if isinstance(adapter, str) and adapter:
        return adapter
    merged = parameters.get("merged_adapters")
    if isinstance(merged, dict) and isinstance(merged.get("ids"), list):
        return ring.merged_key([str(i) for i in merged["ids"]])
    return None


@dataclass
class Gateway:
    replicas: ReplicaSet
    client: httpx.AsyncClient
    metrics: GatewayMetrics
    keys: ApiKeys
    load_factor: float = ring.DEFAULT_LOAD_FACTOR
    max_body_bytes: int = 2 << 20

    async def read_body(self, request: Request) -> bytes | None:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: Request) -> Response:
        if not self.keys.allows(request.headers.get("authorization")):
            return error(401, "a valid API key is required (Authorization: Bearer <key>)", "unauthorized")
        body = await self.read_body(request)
        if body is None:
            return error(413, f"the request body is larger than {self.max_body_bytes} bytes", "validation")
        routable = self.replicas.routable()
        if not routable:
            return error(503, "no replica is ready", "unhealthy")
        path = request.url.path
        key = routing_key(path, body, self.replicas.base_model_ids())
        loads = {name: r.in_flight for name, r in routable.items()}
        order = ring.routing_order(key, loads, self.load_factor)
        top_owner = ring.owners(key, loads, 1)[0] if key is not None else None
        headers = [(k, v) for k, v in request.headers.raw if k.decode().lower() not in HOP_BY_HOP]
        target = path + (f"?{request.url.query}" if request.url.query else "")
        for attempt, name in enumerate(order):
            replica = routable[name]
            upstream = self.client.build_request(request.method, replica.url + target, headers=headers, content=body)
            replica.in_flight += 1
            started = time.perf_counter()
            try:
                response = await until_disconnect(request, self.client.send(upstream, stream=True))
            except RETRYABLE as exc:
                self._failed_attempt(replica, "connect_error")
                log.warning("%s %s: %s failed before responding (%s); trying the next owner", request.method, path, name, type(exc).__name__)
                continue
            except BaseException:  # the client went away: the upstream request was cancelled with it
                replica.in_flight -= 1
                raise
            if response.status_code == 503 and attempt + 1 < len(order):
                await response.aclose()
                self._failed_attempt(replica, "unavailable")
                continue
            out_headers = {k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP - {"content-length"}}
            out_headers["x-lorafleet-replica"] = replica.name
            length = response.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) <= BUFFER_LIMIT:
                # A complete, sized answer (a non-streaming generation): read it whole, which costs
                # less than relaying, and a replica that dies while sending it can still be retried.
                try:
                    content = b"".join([chunk async for chunk in response.aiter_raw()])
                except RETRYABLE + (httpx.ReadError,):
                    self._failed_attempt(replica, "broken_response")
                    continue
                finally:
                    await response.aclose()
                replica.in_flight -= 1
                self._served(replica, response.status_code, started, key, name == top_owner)
                return Response(content, status_code=response.status_code, headers=out_headers)
            self._served(replica, response.status_code, started, key, name == top_owner)
            return StreamingResponse(self._relay(response, replica), status_code=response.status_code, headers=out_headers)
        return error(503, f"no replica could serve the request ({len(order)} tried)", "unhealthy")

    def _failed_attempt(self, replica: Replica, outcome: str) -> None:
        replica.in_flight -= 1
        self.replicas.failed(replica)
        self.metrics.requests.labels(replica.name, outcome).inc()
        self.metrics.retries.inc()

    def _served(self, replica: Replica, status: int, started: float, key: str | None, by_top_owner: bool) -> None:
        self.replicas.succeeded(replica)
        self.metrics.upstream_latency.observe(time.perf_counter() - started)
        self.metrics.routing.labels("none" if key is None else ("owner" if by_top_owner else "spill")).inc()
        self.metrics.requests.labels(replica.name, str(status)).inc()

    async def _relay(self, response: httpx.Response, replica: Replica) -> AsyncIterator[bytes]:
        """Pass the replica's bytes through as they arrive; closing early (client gone) closes upstream too."""
        try:
            async for chunk in response.aiter_raw():
                yield chunk
        except httpx.HTTPError as exc:  # the replica died mid-response: the client sees the cut, nothing is replayed
            log.warning("%s broke off a response (%s)", replica.name, type(exc).__name__)
            self.replicas.failed(replica)
        finally:
            replica.in_flight -= 1
            await response.aclose()

    def describe(self) -> dict[str, Any]:
        return {
            "load_factor": self.load_factor,
            "replicas": [
                {"name": r.name, "url": r.url, "in_flight": r.in_flight, "ejected": r.ejected,
                 "consecutive_failures": r.consecutive_failures, "ejections": r.ejections, "model_id": r.model_id}
                for r in sorted(self.replicas.replicas.values(), key=lambda r: r.name)
            ],
        }
