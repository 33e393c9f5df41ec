"""A loopback OTLP/HTTP trace receiver: what a collector would get, decoded with OpenTelemetry's own protos."""

from __future__ import annotations

import gzip
import threading
import time

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest, ExportTraceServiceResponse

from support.server import ThreadedApp, read_body


class Collector:
    """Spans as dicts: name, service, trace_id, span_id, parent_id (hex), attributes, start/end ns."""

    def __init__(self) -> None:
        self.spans: list[dict] = []
        self.lock = threading.Lock()

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["path"] == "/v1/traces":
            if dict(scope["headers"]).get(b"content-encoding") == b"gzip":
                body = gzip.decompress(body)
            self.add(ExportTraceServiceRequest.FromString(body))
            body = ExportTraceServiceResponse().SerializeToString()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-protobuf")]})
        await send({"type": "http.response.body", "body": body if scope["path"] == "/v1/traces" else b"ok"})

    def add(self, request: ExportTraceServiceRequest) -> None:
        for resource_spans in request.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    attributes = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                    with self.lock:
                        self.spans.append({"name": span.name, "service": service, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                                           "parent_id": span.parent_span_id.hex(), "attributes": attributes,
                                           "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                           "events": [e.name for e in span.events]})

    def trace(self, trace_id: str, count: int, timeout: float = 15) -> list[dict]:
        """The spans of one trace, once ``count`` of them arrived (exporters batch for up to half a second)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                found = [s for s in self.spans if s["trace_id"] == trace_id]
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"trace {trace_id}: {len(found)} spans arrived, {count} expected: {[s['name'] for s in found]}")


def running_collector() -> ThreadedApp:
    collector = Collector()
    app = ThreadedApp(collector)
    app.collector = collector
    return app
