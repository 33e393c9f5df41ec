"""A tenant's usage, read from what the replica answered: counted in metrics, charged to its token limits, logged.

The replica states a request's prompt tokens in ``x-prompt-tokens`` and, for a whole answer, its generated tokens in
``x-generated-tokens``; a stream states its generated tokens in its closing usage comment (lorafleet/usage_line.py),
which this relays like any other bytes (SSE clients ignore comments). Each count is charged the moment it is seen, so a
tenant's token bucket follows its streams as they end, not as they start.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from lorafleet.gateway.metrics import GatewayMetrics
from lorafleet.gateway.tenant_limits import Tenant
from lorafleet.usage_line import generated_in

access_log = logging.getLogger("lorafleet.gateway.access")
Send = Callable[[dict], Awaitable[None]]


class TenantUsage:
    """Wraps one admitted request's ``send``; ``finish`` counts the outcome, frees the tenant's place and logs the line."""

    def __init__(self, tenant: Tenant, metrics: GatewayMetrics, send: Send, method: str, path: str, requested: str | None,
                 log_access: bool = True) -> None:
        self.tenant, self.metrics, self._send = tenant, metrics, send
        self.method, self.path, self.requested, self.log_access = method, path, requested, log_access
        self.status: int | None = None
        self.prompt = self.generated = 0
        self.started = time.perf_counter()
        self._streaming = False

    def _charge(self, kind: str, tokens: int) -> None:
        if kind == "prompt":
            self.prompt += tokens
        else:
            self.generated += tokens
        self.metrics.tenant_tokens.labels(self.tenant.name, kind).inc(tokens)
        self.tenant.charge(tokens, time.monotonic())

    async def send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            for k, v in message.get("headers", []):
                if k == b"x-prompt-tokens" and v.isdigit():
                    self._charge("prompt", int(v))
                elif k == b"x-generated-tokens" and v.isdigit():
                    self._charge("generated", int(v))
                elif k == b"content-type":
                    self._streaming = v.startswith(b"text/event-stream")
        elif self._streaming and (generated := generated_in(message.get("body", b""))) is not None:
            self._charge("generated", generated)
        await self._send(message)

    def finish(self) -> None:
        self.tenant.done()
        outcome = str(self.status if self.status is not None else 499)  # 499: the client left before an answer started
        self.metrics.tenant_requests.labels(self.tenant.name, outcome).inc()
        if self.log_access:
            access_log.info("tenant=%s %s %s adapter=%s status=%s prompt_tokens=%d generated_tokens=%d ms=%.1f", self.tenant.name, self.method,
                            self.path, self.requested or "-", outcome, self.prompt, self.generated, (time.perf_counter() - self.started) * 1e3)


def refused(tenant: Tenant, metrics: GatewayMetrics, method: str, path: str, requested: str | None, status: int, message: str,
            log_access: bool = True) -> None:
    """A request the tenant's policy refused (404, 429): counted and logged as its answered ones are."""
    metrics.tenant_requests.labels(tenant.name, str(status)).inc()
    if log_access:
        access_log.info("tenant=%s %s %s adapter=%s status=%d refused: %s", tenant.name, method, path, requested or "-", status, message)
