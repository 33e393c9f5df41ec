"""The gateway's request path: read the body once, pick the replica, proxy bytes, fail over.

Only ``parameters.adapter_id`` (TGI/LoRAX routes) or ``model`` (OpenAI routes) is read from the
body; the bytes and headers go upstream untouched, and the response streams back chunk by chunk
as the replica writes it (SSE events are not buffered). A connection error, a timeout before the
response starts, or a 503 sends the request to the next owner; once a response has started it is
never replayed. This is plain ASGI over httpcore (httpx's own transport): a framework's and
httpx's per-request models would be most of what the gateway adds to a request's latency
(bench/gateway_overhead.py: a bare relay adds ~1.0 ms through httpx, ~0.7 ms through httpcore).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpcore

from lorafleet import ring
from lorafleet.bearer import bearer_token
from lorafleet.cache_salt import HOP_TOKEN_HEADER, SALT_HEADER, salt_for_key
from lorafleet.gateway.auth import ApiKeys
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.demand import DemandStamp
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.replicas import Replica, ReplicaSet
from lorafleet.gateway.request_keys import prompt_start, request_payload, routing_key
from lorafleet.gateway.tenant_limits import Tenant
from lorafleet.gateway.tenant_usage import TenantUsage
from lorafleet.gateway.tenant_usage import refused as usage_refused
from lorafleet.gateway.tenants import Tenants
from lorafleet.tracing import TRACE_HEADERS, Tracing
from lorafleet.traffic_split import VARIANT_HEADER, Split

log = logging.getLogger(__name__)
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
T = TypeVar("T")
HOP_BY_HOP = {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}
# The client's credential, and the headers only the gateway may set (a client's copy would pick its cache partition).
NOT_FORWARDED = HOP_BY_HOP | {"authorization", "proxy-authorization", "cookie", SALT_HEADER, HOP_TOKEN_HEADER, VARIANT_HEADER}
ADMIN_PREFIX = "/adapters"  # load, pin, unload: the operator calls each replica with the admin token, never through here
BUFFER_LIMIT = 1 << 20  # sized responses up to this are read whole rather than relayed
# Before a response starts, any transport failure is retryable: a refused or reset connection
# (a replica killed mid-request resets it: ReadError), a timeout, or a peer that hung up.
RETRYABLE = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.RemoteProtocolError)
BROKEN = (httpcore.NetworkError, httpcore.TimeoutException, httpcore.ProtocolError)  # a response cut short


class ClientGone(Exception):
    """The client disconnected; its upstream request was cancelled."""


class ReplicaEjected(Exception):
    """The replica was ejected while this request waited for its answer to start; try the next owner."""


async def unless_client_gone(work: Awaitable[T], receive: Receive, ejected: asyncio.Event | None = None) -> T:
    """Await ``work``, cancelling it and raising ClientGone if the client disconnects first (or
    ReplicaEjected when ``ejected`` is set first).

    Once the request body is read, the server's ``receive`` answers only with the disconnect;
    its ``send`` does not fail after one (uvicorn drops the bytes), so this is the only place
    a proxy learns that nobody is listening.
    """
    working, watching = asyncio.ensure_future(work), asyncio.ensure_future(receive())
    waiting = {working, watching}
    ejection = asyncio.ensure_future(ejected.wait()) if ejected is not None else None
    if ejection is not None:
        waiting.add(ejection)
    try:
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if working in done:
            return working.result()
        if watching in done:
            raise ClientGone()
        raise ReplicaEjected()
    finally:
        watching.cancel()
        if ejection is not None:
            ejection.cancel()
        if not working.done():
            working.cancel()
            await asyncio.gather(working, return_exceptions=True)  # its cleanup (closing the upstream) runs now


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None,
                  content_type: bytes = b"application/json") -> None:
    head = [(b"content-type", content_type), (b"content-length", str(len(body)).encode())] if headers is None else headers
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, status: int, message: str, error_type: str, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps({"error": message, "error_type": error_type}).encode()
    await respond(send, status, body, [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
                  if headers else None)


@dataclass
class Gateway:
    replicas: ReplicaSet
    pool: httpcore.AsyncConnectionPool
    metrics: GatewayMetrics
    keys: ApiKeys
    config: GatewayConfig
    tracing: Tracing | None = None
    tenants: Tenants | None = None
    demand: DemandStamp = field(default_factory=lambda: DemandStamp(None))
    _turn: int = 0
    _held: int = 0  # requests waiting for a first replica

    def _plain_order(self, loads: dict[str, int]) -> list[str]:
        """The adapter-blind policies a user would otherwise deploy, for comparison on the same fleet."""
        names = sorted(loads)
        self._turn += 1
        start = self._turn % len(names)
        rotated = names[start:] + names[:start]
        if self.config.policy == "round-robin":
            return rotated
        return sorted(rotated, key=lambda m: loads[m])  # least-loaded; ties take turns

    async def read_body(self, scope: dict, receive: Receive) -> bytes | None:
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.config.max_body_bytes:
            return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def handle(self, scope: dict, receive: Receive, send: Send) -> None:
        headers = scope["headers"]
        authorization = next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None)
        tenant = self.tenants.tenant_for(authorization) if self.tenants is not None and self.tenants.active else None
        if not self.keys.allows(authorization) or (tenant is None and self.tenants is not None and self.tenants.active):
            return await respond_error(send, 401, "a valid API key is required (Authorization: Bearer <key>)", "unauthorized")
        if scope["path"] == ADMIN_PREFIX or scope["path"].startswith(ADMIN_PREFIX + "/"):
            return await respond_error(send, 403, "the admin routes (/adapters) are not served through the gateway; "
                                       "the operator calls each replica with its admin token", "forbidden")
        try:
            body = await self.read_body(scope, receive)
        except ClientGone:
            return
        if body is None:
            return await respond_error(send, 413, f"the request body is larger than {self.config.max_body_bytes} bytes", "validation")
        routable = self.replicas.routable() or await self._hold_for_a_replica(receive)
        if not routable:
            wait = [(b"retry-after", b"10")] if self.config.hold_at_zero_s else None
            return await respond_error(send, 503, "no replica is ready" + (" (the fleet is starting one; retry)" if wait else ""), "unhealthy", wait)
        path = scope["path"]
        payload = request_payload(path, body)
        requested = routing_key(path, payload, self.replicas.base_model_ids())
        if tenant is not None:
            refused = self.tenants.refusal(tenant, requested, time.monotonic())
            if refused is not None:
                status, message, kind, wait = refused
                usage_refused(tenant, self.metrics, scope["method"], path, requested, status, message, self.config.access_log)
                return await respond_error(send, status, message, kind, [(b"retry-after", str(math.ceil(wait)).encode())] if wait else None)
            usage = TenantUsage(tenant, self.metrics, send, scope["method"], path, requested, self.config.access_log)
            try:
                return await self._serve(scope, receive, usage.send, body, routable, path, payload, requested, headers, authorization, tenant)
            finally:
                usage.finish()
        await self._serve(scope, receive, send, body, routable, path, payload, requested, headers, authorization, None)

    async def _serve(self, scope: dict, receive: Receive, send: Send, body: bytes, routable: dict[str, Replica], path: str, payload: Any,
                     requested: str | None, headers: list[tuple[bytes, bytes]], authorization: str | None, tenant: Tenant | None) -> None:
        key, version, order, top_owner, hot = self._route(path, payload, requested, routable, headers, authorization)
        forward = self._forward_headers(headers, scope["method"], body, authorization, tenant)
        if version is not None:  # the version routed by, named to the replica (a client's own copy of this header was dropped)
            forward.append((VARIANT_HEADER.encode(), version))
        target = path + ("?" + scope["query_string"].decode("latin-1") if scope.get("query_string") else "")
        timeout = {"connect": 2.0, "read": self.config.upstream_timeout, "write": self.config.upstream_timeout, "pool": self.config.upstream_timeout}
        span = None
        if self.tracing is not None:  # the gateway's span becomes the replica's parent
            span = self.tracing.tracer.start_span(f"gateway {scope['method']} {path}", context=self.tracing.extract(headers), kind=_server_kind(),
                                                  attributes={"lorafleet.adapter": key or "", "lorafleet.routing.top_owner": top_owner or "",
                                                              "lorafleet.routing.candidates": len(order)})
            forward = [(k, v) for k, v in forward if k.lower() not in TRACE_HEADERS] + self.tracing.inject(span)
        try:
            for attempt, name in enumerate(order):
                replica = routable[name]
                upstream = httpcore.Request(scope["method"], replica.url + target, headers=[(b"host", replica.host), *forward],
                                            content=body, extensions={"timeout": timeout})
                replica.in_flight += 1  # the one increment; the finally below is the one decrement
                try:
                    last = attempt + 1 == len(order)
                    if await self._attempt(upstream, replica, last, scope, receive, send, key, self._placement(name, top_owner, hot), span):
                        return
                finally:
                    replica.in_flight -= 1
            if span is not None:
                span.set_attribute("http.response.status_code", 503)
            await respond_error(send, 503, f"no replica could serve the request ({len(order)} tried)", "unhealthy")
        finally:
            if span is not None:
                span.end()

    async def _hold_for_a_replica(self, receive: Receive) -> dict[str, Replica]:
        """Scale from zero: wait (bounded in time and in number of waiters) for a replica, having said there is demand."""
        if not self.config.hold_at_zero_s or self._held >= self.config.hold_queue:
            if self.config.hold_at_zero_s:
                self.metrics.held.labels("overflow").inc()
            return {}
        self._held += 1
        started = time.monotonic()
        try:
            await self.demand.stamp()

            async def ready() -> dict[str, Replica]:
                while not (routable := self.replicas.routable()) and time.monotonic() - started < self.config.hold_at_zero_s:
                    await asyncio.sleep(0.1)
                return routable

            routable = await unless_client_gone(ready(), receive)
        except ClientGone:
            return {}
        finally:
            self._held -= 1
        self.metrics.held.labels("served" if routable else "timeout").inc()
        return routable

    def _route(self, path: str, payload: Any, requested: str | None, routable: dict[str, Replica], headers: list[tuple[bytes, bytes]],
               authorization: str | None) -> tuple[str | None, bytes | None, list[str], str | None, set[str]]:
        """(the adapter's ring key, the header naming that version when a registered name was asked for, the replicas
        to try in order, the key's top owner, the replicas holding it hot)."""

        def identity(split: Split) -> str | None:
            if split.stickiness == "apiKey":
                return bearer_token(authorization) if authorization else None
            wanted = split.header.encode("latin-1")
            return next((v.decode("latin-1") for k, v in headers if k.lower() == wanted), None) if split.stickiness == "header" else None

        key, version = self.replicas.catalogue.choose(requested, identity)
        ring_key = key
        if self.config.prefix_chars and (start := prompt_start(path, payload, self.config.prefix_chars)) is not None:
            ring_key = f"{key or ''}\0{start}"  # one tenant's shared prefix meets its own cached blocks
        loads = {name: r.in_flight for name, r in routable.items()}
        by_adapter = ring_key is not None and ring_key == key  # where the adapter is hot matters only when routing by it
        hot = set(self.replicas.hot.holders(key)) if by_adapter else set()
        ranked = ring.owners(ring_key, loads) if ring_key is not None else []
        warm = self.replicas.hot.warm_holders(key) if by_adapter else set()
        spread = self.replicas.catalogue.spread(requested) if by_adapter and self.config.policy == "lorafleet" else 1
        if spread > 1:  # a hot adapter warmed on its first `spread` owners (demand-driven): the least loaded of them first
            owners = ranked[:spread]
            order = sorted(owners, key=lambda m: (loads[m], owners.index(m))) + ranked[spread:]
        elif self.config.policy == "lorafleet":
            order = ring.routing_order(ring_key, loads, self.config.load_factor, hot, ranked, self.config.min_bound, warm)
        else:
            order = self._plain_order(loads)
        return key, version, order, ranked[0] if ranked else None, hot

    def _forward_headers(self, headers: list[tuple[bytes, bytes]], method: str, body: bytes, authorization: str | None,
                         tenant: Tenant | None = None) -> list[tuple[bytes, bytes]]:
        """Header values as h11 accepts them (no surrounding whitespace), and never the client's credential: the gateway
        consumed it, and nothing behind the gateway may see it. With keys, each caller's prefix cache is its own."""
        forward = [(k, v.strip()) for k, v in headers if k.decode("latin-1").lower() not in NOT_FORWARDED]
        if body or method in ("POST", "PUT", "PATCH"):
            forward.append((b"content-length", str(len(body)).encode()))
        # Each caller's prefix cache is its own: a tenant's (all its keys share it; tenants that declare their prompts
        # shareable, cache scope Shared, share one), else the key's.
        partition = ("shared" if tenant.shared_cache else f"tenant:{tenant.name}") if tenant is not None else bearer_token(authorization) if self.keys.path is not None and authorization else None
        if self.config.warm_token and partition:
            forward += [(SALT_HEADER.encode(), salt_for_key(partition).encode()), (HOP_TOKEN_HEADER.encode(), self.config.warm_token.encode())]
        return forward

    async def _attempt(self, upstream: httpcore.Request, replica: Replica, last: bool, scope: dict, receive: Receive, send: Send,
                       key: str | None, placement: str, span: Any = None) -> bool:
        """One try on one replica: True when the client got an answer (or left), False to try the next owner."""
        started = time.perf_counter()
        # A replica already ejected is being tried because every one is: do not give up on it for that.
        ejected = None if replica.ejected else replica.ejected_signal
        try:
            response = await unless_client_gone(self.pool.handle_async_request(upstream), receive, ejected)
        except ReplicaEjected:
            self._failed_attempt(replica, "ejected", span)
            log.warning("%s %s: %s was ejected before answering; trying the next owner", scope["method"], scope["path"], replica.name)
            return False
        except RETRYABLE as exc:
            self._failed_attempt(replica, "connect_error", span)
            log.warning("%s %s: %s failed before responding (%s); trying the next owner", scope["method"], scope["path"], replica.name, type(exc).__name__)
            return False
        except ClientGone:
            return True
        except httpcore.LocalProtocolError as exc:  # a request HTTP/1.1 cannot carry upstream: the client's to fix
            await respond_error(send, 400, f"the request cannot be forwarded: {exc}", "validation")
            return True
        if response.status == 503 and not last:
            await response.aclose()
            self._failed_attempt(replica, "unavailable", span)
            return False
        out_headers, length, served = [], None, {}
        for k, v in response.headers:
            lowered = k.decode("latin-1").lower()
            if lowered == "content-length":
                length = v
            elif lowered in ("x-adapter-id", "x-adapter-name"):  # the version the replica served, the registered name asked by
                served[lowered] = v.decode("latin-1")
            if lowered not in HOP_BY_HOP or lowered == "content-length":
                out_headers.append((k, v))
        out_headers.append((b"x-lorafleet-replica", replica.name.encode()))
        served_as = served.get("x-adapter-name") or served.get("x-adapter-id") or key  # labelled by name, as the replicas do
        if length is not None and length.isdigit() and int(length) <= BUFFER_LIMIT:
            # A complete, sized answer (a non-streaming generation): read it whole, which costs
            # less than relaying, and a replica that dies while sending it can still be retried.
            try:
                content = await response.aread()
            except BROKEN:
                self._failed_attempt(replica, "broken_response", span)
                return False
            finally:
                await response.aclose()
            self._served(replica, response.status, started, key, placement, served_as, span)
            await respond(send, response.status, content, out_headers)
            return True
        self._served(replica, response.status, started, key, placement, served_as, span)
        await self._relay(response, replica, out_headers, send, receive)
        return True

    async def _relay(self, response: httpcore.Response, replica: Replica, headers: list[tuple[bytes, bytes]], send: Send,
                     receive: Receive) -> None:
        """Pass the replica's bytes through as they arrive; a client gone closes the upstream response too.

        Closing the upstream connection is what makes the replica cancel the generation.
        """

        async def pump() -> None:
            await send({"type": "http.response.start", "status": response.status, "headers": headers})
            async for chunk in response.aiter_stream():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})

        try:
            await unless_client_gone(pump(), receive)
        except BROKEN as exc:  # the replica died mid-response: the client sees the cut, nothing is replayed
            log.warning("%s broke off a response (%s)", replica.name, type(exc).__name__)
            self.replicas.failed(replica)
        except (ClientGone, OSError):  # the client went away
            pass
        finally:
            await response.aclose()

    def _failed_attempt(self, replica: Replica, outcome: str, span: Any = None) -> None:
        if span is not None:
            span.add_event("retry", {"lorafleet.replica": replica.name, "lorafleet.outcome": outcome})
        self.replicas.failed(replica)
        self.metrics.requests.labels(replica.name, outcome).inc()
        self.metrics.retries.inc()

    @staticmethod
    def _placement(name: str, top_owner: str | None, hot: set[str]) -> str:
        """How the serving replica was chosen: the top owner, another replica holding it hot, or a spill."""
        if top_owner is None:
            return "none"
        return "owner" if name == top_owner else ("hot" if name in hot else "spill")

    def _served(self, replica: Replica, status: int, started: float, key: str | None, placement: str, served_as: str | None,
                span: Any = None) -> None:
        if span is not None:
            span.set_attributes({"lorafleet.replica": replica.name, "lorafleet.routing.placement": placement, "http.response.status_code": status})
        self.replicas.succeeded(replica)
        if key is not None and status == 200:
            self.replicas.hot.used(replica.name, key)  # the replica now holds it (it loaded it if it had not)
        self.metrics.upstream_latency.observe(time.perf_counter() - started)
        self.metrics.routing.labels(placement).inc()
        if status == 200:
            self.metrics.adapter_requests.labels(self.metrics.adapters.label(served_as or ""), placement).inc()
        self.metrics.requests.labels(replica.name, str(status)).inc()

    def describe(self) -> dict[str, Any]:
        return {
            "load_factor": self.config.load_factor,
            "replicas": [
                {"name": r.name, "url": r.url, "in_flight": r.in_flight, "hot_adapters": self.replicas.hot.count(r.name), "ejected": r.ejected,
                 "consecutive_failures": r.consecutive_failures, "ejections": r.ejections, "model_id": r.model_id}
                for r in sorted(self.replicas.replicas.values(), key=lambda r: r.name)
            ],
        }


def _server_kind() -> Any:
    from opentelemetry.trace import SpanKind

    return SpanKind.SERVER
