"""The replica's spans: one per generate request (parented by the caller's ``traceparent``), with children
for the phases a request spends its time in, stamped afterwards from the sequence's own clocks.

queue        arrival until the scheduler first ran it (includes waiting for its adapter)
adapter_load the adapter's load when the request found it off the device (tier it came from)
prefill      first scheduled until the first token
decode       first token until the last, with the token counts
"""

from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

from lorafleet.server.engine.sequence import Sequence
from lorafleet.tracing import Tracing, epoch_ns

REQUEST_SPAN: ContextVar[Any] = ContextVar("lorafleet_request_span", default=None)


def start_request_span(tracing: Tracing, scope: dict) -> Any:
    from opentelemetry.trace import SpanKind

    span = tracing.tracer.start_span(f"replica {scope['method']} {scope['path']}", context=tracing.extract(scope["headers"]), kind=SpanKind.SERVER)
    REQUEST_SPAN.set(span)
    return span


def record_generation(tracing: Tracing, seq: Sequence, adapter: str, load_seconds: dict[str, float], load_source: str,
                      first_token_s: float, rest_s: float) -> None:
    """Children of the current request span for one finished generation (best_of makes several)."""
    from opentelemetry import trace

    parent = REQUEST_SPAN.get()
    if parent is None:
        return
    context = trace.set_span_in_context(parent)
    end = time.time_ns()
    first_token = end - int(rest_s * 1e9)
    arrived = epoch_ns(seq.created_at)
    scheduled = epoch_ns(seq.first_scheduled_at) if seq.first_scheduled_at is not None else first_token
    parent.set_attributes({"lorafleet.adapter": adapter, "lorafleet.adapter.tier": seq.adapter_tier or "base",
                           "gen_ai.usage.input_tokens": seq.num_prompt, "gen_ai.usage.output_tokens": len(seq.tokens),
                           "lorafleet.finish_reason": seq.finish_reason.value if seq.finish_reason else "",
                           "lorafleet.preemptions": seq.num_preemptions})

    def child(name: str, start: int, stop: int, **attributes: Any) -> None:
        span = tracing.tracer.start_span(name, context=context, start_time=start, attributes=attributes)
        span.end(end_time=max(start, stop))

    child("queue", arrived, scheduled)
    if seq.adapter_tier not in ("", "device"):  # cold: the load happened while the request queued
        loading = int(sum(load_seconds.values()) * 1e9)
        child("adapter_load", arrived, arrived + loading, **{"lorafleet.adapter.tier": seq.adapter_tier, "lorafleet.adapter.source_tier": load_source,
                                                             **{f"lorafleet.adapter.{step}_s": s for step, s in load_seconds.items()}})
    child("prefill", scheduled, first_token, **{"gen_ai.usage.input_tokens": seq.num_prompt})
    child("decode", first_token, end, **{"gen_ai.usage.output_tokens": len(seq.tokens)})
