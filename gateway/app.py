"""The gateway's ASGI application: /health, /metrics, /replicas, and the proxy for everything else."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import AsyncIterator

import httpx
from prometheus_client import generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from lorafleet.gateway.auth import ApiKeys
from lorafleet.gateway.discovery import static_members, watch_service
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.proxy import Gateway
from lorafleet.gateway.replicas import ReplicaSet


def create_gateway_app(replica_urls: list[str] | None = None, service: str | None = None, load_factor: float = 1.25,
                       api_key_file: Path | None = None, max_body_bytes: int = 2 << 20, upstream_timeout: float = 300.0,
                       probe_interval: float = 1.0) -> Starlette:
    if bool(replica_urls) == bool(service):
        raise ValueError("give either --replica URLs or --service NAMESPACE/NAME")
    metrics = GatewayMetrics()
    replicas = ReplicaSet(on_eject=metrics.ejections.inc)
    keys = ApiKeys(api_key_file)
    state: dict = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(upstream_timeout, connect=2.0)
        async with httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=64)) as client:
            gateway = Gateway(replicas, client, metrics, keys, load_factor, max_body_bytes)
            state["gateway"] = gateway
            stop = threading.Event()
            if replica_urls:
                replicas.update(static_members(replica_urls))
            else:
                namespace, _, name = service.partition("/")
                watch_service(namespace, name, asyncio.get_running_loop(), replicas.update, stop)
            probes = asyncio.create_task(replicas.probe_forever(client, probe_interval))
            try:
                yield
            finally:
                stop.set()
                probes.cancel()

    async def health(_: Request) -> Response:
        if replicas.routable() and any(not r.ejected for r in replicas.replicas.values()):
            return Response(status_code=200)
        return JSONResponse({"error": "no replica is ready", "error_type": "unhealthy"}, status_code=503)

    async def metrics_route(_: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type="text/plain; version=0.0.4")

    async def replicas_route(request: Request) -> Response:
        if not keys.allows(request.headers.get("authorization")):
            return JSONResponse({"error": "a valid API key is required", "error_type": "unauthorized"}, status_code=401)
        return JSONResponse(state["gateway"].describe())

    async def proxy(request: Request) -> Response:
        return await state["gateway"].handle(request)

    methods = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
    return Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_route, methods=["GET"]),
            Route("/replicas", replicas_route, methods=["GET"]),
            Route("/{path:path}", proxy, methods=methods),
        ],
        lifespan=lifespan,
    )
