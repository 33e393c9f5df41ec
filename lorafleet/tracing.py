"""OpenTelemetry tracing for the gateway and the replica, off unless an OTLP endpoint is configured.

``--otlp-endpoint`` (or the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``
variables) turns it on; ``OTEL_SERVICE_NAME`` names the service. Each server gets a provider of its own
rather than the process-global one, so several can share a process (tests, ``lorafleet up``). With
tracing off the servers hold ``None`` and test for it: no span objects, no context extraction, nothing
imported. W3C ``traceparent`` / ``tracestate`` carry the trace from client to gateway to replica.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

TRACE_HEADERS = (b"traceparent", b"tracestate")


def otlp_traces_url(endpoint: str | None) -> str | None:
    """The OTLP/HTTP traces URL from a flag or the environment (None: tracing off).

    As the OTel spec has it, the signal-specific variable is used as given and the general one gets
    ``/v1/traces`` appended; so does a flag value without a path."""
    if endpoint:
        return endpoint if endpoint.rstrip("/").endswith("/v1/traces") else endpoint.rstrip("/") + "/v1/traces"
    specific = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if specific:
        return specific
    general = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    return general.rstrip("/") + "/v1/traces" if general else None


@dataclass
class Tracing:
    """A tracer with its own provider (batching exporter), and the W3C propagator."""

    tracer: Any
    provider: Any
    propagator: Any

    def extract(self, headers: Iterable[tuple[bytes, bytes]]) -> Any:
        """The caller's trace context from ASGI headers (an empty context when there is none)."""
        carrier = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in headers if k.lower() in TRACE_HEADERS}
        return self.propagator.extract(carrier)

    def inject(self, span: Any) -> list[tuple[bytes, bytes]]:
        """Headers that make ``span`` the parent of whatever the next hop records."""
        from opentelemetry import trace

        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context=trace.set_span_in_context(span))
        return [(k.encode("latin-1"), v.encode("latin-1")) for k, v in carrier.items()]

    def shutdown(self) -> None:
        """Flush what is batched, then stop the exporter."""
        self.provider.shutdown()


def setup_tracing(service_name: str, endpoint: str | None = None, exporter: Any = None) -> Tracing | None:
    """Tracing for one server, or None when no endpoint is configured (``exporter`` replaces OTLP in tests)."""
    url = otlp_traces_url(endpoint)
    if url is None and exporter is None:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=url)
    provider = TracerProvider(resource=Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name}))
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=500))
    return Tracing(provider.get_tracer("lorafleet"), provider, TraceContextTextMapPropagator())


def epoch_ns(monotonic_s: float) -> int:
    """A time.monotonic() reading as the wall-clock nanoseconds spans are stamped with."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)
