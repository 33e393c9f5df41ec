"""Errors a request can meet, each with the HTTP status and error_type clients expect.

lorax-client and text-generation map ``error_type`` first, then the status: 422 validation, 400/415
for a body that is not JSON, 429 overloaded, 424 generation (the adapter cannot be fetched or used,
or generation failed), 404 not_found for an adapter its source does not have (LoRAX says 424; a clear
404 is better), 503 unhealthy. A leaf module: every room may raise these; server/api/errors.py maps every
exception a route meets (these and the adapters', sources' and engine's own) to its status.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be served; carries its status and error_type."""

    status = 422
    error_type = "validation"

    def __init__(self, message: str, status: int | None = None, error_type: str | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type


class ValidationError(RequestError):
    status, error_type = 422, "validation"


class Overloaded(RequestError):
    status, error_type = 429, "overloaded"


class Unauthorized(RequestError):
    status, error_type = 401, "unauthorized"


class Forbidden(RequestError):
    status, error_type = 403, "forbidden"


class Conflict(RequestError):
    status, error_type = 409, "conflict"


class Unhealthy(RequestError):
    status, error_type = 503, "unhealthy"


class ClientGone(RequestError):
    """The client closed its connection before its answer (nginx's 499): nobody reads the response, and the access
    log and the metrics say so without an error and a traceback for each hang-up (the hostile soak's abandoned
    requests logged one ERROR each)."""
    status, error_type = 499, "client_closed"
