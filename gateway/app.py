"""The gateway's ASGI application: /health, /metrics, /replicas, and the proxy for everything else."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from typing import Any

import httpcore
import httpx
from prometheus_client import generate_latest

from lorafleet.gateway.auth import ApiKeys
from lorafleet.gateway.config import GatewayConfig
from lorafleet.gateway.demand import DemandStamp
from lorafleet.gateway.discovery import static_members, watch_service
from lorafleet.gateway.handoff import HandOff
from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.proxy import Gateway, Receive, Send, respond, respond_error
from lorafleet.gateway.replicas import ReplicaSet
from lorafleet.gateway.tenants import Tenants
from lorafleet.http_limits import head_too_large
from lorafleet.tracing import setup_tracing

log = logging.getLogger(__name__)


class GatewayApp:
    """An ASGI app; the lifespan opens the upstream client, discovery and the health probes."""

    def __init__(self, replica_urls: list[str] | None, service: str | None, config: GatewayConfig) -> None:
        if bool(replica_urls) == bool(service):
            raise ValueError("give either --replica URLs or --service NAMESPACE/NAME")
        self.replica_urls, self.service, self.config = replica_urls, service, config
        self.metrics = GatewayMetrics(config.metrics_adapter_labels)
        self.replicas = ReplicaSet(on_eject=self.metrics.ejections.inc)
        self.metrics.watch_replicas(self.replicas.states)
        self.keys = ApiKeys(config.api_key_file)
        self.tenants = Tenants(config.tenants_file, config.tenant_gateways)
        self.gateway: Gateway | None = None
        self._stop = threading.Event()
        self._probes: asyncio.Task | None = None
        self._probe_client: httpx.AsyncClient | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            return await self._lifespan(receive, send)
        if scope["type"] != "http":
            return
        too_large = head_too_large(scope)
        if too_large is not None:
            return await respond_error(send, 431, too_large, "validation")
        path, method = scope["path"], scope["method"]
        if not path.startswith("/"):  # "*" (OPTIONS *, an HTTP/2 preface read as HTTP/1) or an absolute form
            return await respond_error(send, 400, f"the request target must be a path, got {path[:100]!r}", "validation")
        if path == "/health" and method == "GET":
            if any(not r.ejected for r in self.replicas.replicas.values()):
                return await respond(send, 200, b"")
            return await respond_error(send, 503, "no replica is ready", "unhealthy")
        if path == "/metrics" and method == "GET":
            if self.config.metrics_port:  # on its own port, out of the tenants' reach
                return await respond_error(send, 404, "not found", "not_found")
            return await respond(send, 200, generate_latest(self.metrics.registry), content_type=b"text/plain; version=0.0.4")
        if path in ("/replicas", "/v1/models") and method == "GET":
            authorization = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None)
            tenant = self.tenants.tenant_for(authorization) if self.tenants.active else None
            if not self.keys.allows(authorization) or (self.tenants.active and tenant is None):
                return await respond_error(send, 401, "a valid API key is required", "unauthorized")
            if path == "/v1/models":  # the fleet's catalogue, once, not one replica's view of it; a tenant's: what it may call
                catalogue = self.replicas.catalogue
                base = self.config.served_model_name or next((r.model_id for r in self.replicas.replicas.values() if r.model_id), None) or catalogue.base
                listed = catalogue.models(base if tenant is None or tenant.base else None, int(time.time()),
                                          self.tenants.visible(tenant, catalogue.entries) if tenant is not None else None)
                return await respond(send, 200, json.dumps(listed).encode())
            return await respond(send, 200, json.dumps(self.gateway.describe()).encode())
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.gateway.handle(scope, receive, watched)
        except Exception:  # a bug must cost one request a 502, never the process or a count
            log.exception("%s %s failed in the gateway", method, path)
            if not started:
                await respond_error(send, 502, "the gateway failed to proxy this request", "gateway")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.loop = asyncio.get_running_loop()  # membership changes come from other threads through it
                pool = httpcore.AsyncConnectionPool(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30.0)
                config = self.config
                self.gateway = Gateway(self.replicas, pool, self.metrics, self.keys, config, setup_tracing("lorafleet-gateway", config.otlp_endpoint),
                                       tenants=self.tenants, demand=DemandStamp(config.demand_basemodel))
                self._probe_client = httpx.AsyncClient(timeout=2.0)
                if config.handoff:
                    self.replicas.handoff = HandOff(self.replicas, self._probe_client, self.metrics.handoffs, warm_token=config.warm_token)
                if self.replica_urls:
                    self.replicas.update(static_members(self.replica_urls))
                else:
                    namespace, _, name = self.service.partition("/")
                    watch_service(namespace, name, asyncio.get_running_loop(), self.replicas.update, self._stop)
                self._probes = asyncio.create_task(self.replicas.probe_forever(self._probe_client, self.config.probe_interval))
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._stop.set()
                if self.replicas.handoff is not None:
                    self.replicas.handoff.cancel()
                if self._probes is not None:
                    self._probes.cancel()
                if self.gateway is not None:
                    await self.gateway.pool.aclose()
                    await self._probe_client.aclose()
                    if self.gateway.tracing is not None:
                        await asyncio.to_thread(self.gateway.tracing.shutdown)  # flush the last spans
                await send({"type": "lifespan.shutdown.complete"})
                return


def create_gateway_app(replica_urls: list[str] | None = None, service: str | None = None, config: GatewayConfig | None = None,
                       **overrides: Any) -> GatewayApp:
    """The gateway app for ``--replica`` URLs or a ``--service``; ``overrides`` replace GatewayConfig fields (tests)."""
    config = config or GatewayConfig()
    for name, value in overrides.items():
        setattr(config, name, value)
    return GatewayApp(replica_urls, service, config)
