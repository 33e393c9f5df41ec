"""Which status an exception that reaches a route answers with: the one mapping, for the app's handler (app.py)
and for errors met mid-stream (streaming.py)."""

from __future__ import annotations

from lorafleet.adapter_fetch import AdapterFetchError, AdapterNotFound
from lorafleet.server.errors import RequestError
from lorafleet.server.lora.adapter_format import AdapterError

# What a route may raise on purpose; the app has one handler for them all (server/api/app.py). Anything else is a bug
# and answers 500.
HANDLED = (RequestError, LookupError, RuntimeError, ValueError, TimeoutError)


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, error_type, message) for any exception that reaches a route."""
    if isinstance(exc, RequestError):
        return exc.status, exc.error_type, str(exc)
    if isinstance(exc, TimeoutError):  # a wait on the engine (a device slot, a reply) that ran out: try again
        return 503, "overloaded", str(exc)
    if isinstance(exc, AdapterNotFound):
        return 404, "not_found", str(exc)
    if isinstance(exc, (AdapterError, AdapterFetchError)):
        return 424, "generation", str(exc)
    if isinstance(exc, ValueError):  # the engine's and the adapter ids' own checks
        return 422, "validation", str(exc)
    return 424, "generation", f"generation failed: {exc}"
