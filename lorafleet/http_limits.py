"""What one HTTP client may cost a process (gateway or replica) before it has sent a request.

uvicorn, as configured by default, takes headers of any size with httptools (eight 16 MB headers
took a gateway from 64 to 620 MB), waits forever for headers that trickle in, and accepts
connections until the process runs out of file descriptors (20k half-open sockets did). Both
servers therefore run uvicorn's h11 protocol with:

- a bound on the request head (request line and headers together): more is a 400;
- a deadline for the head to arrive complete, from the connection's start or from the end of
  the previous response on a kept-alive connection: a client that trickles is disconnected;
- a cap on open connections, below the process's descriptor limit: one more is closed at once.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

MAX_HEAD_BYTES = 64 << 10
MAX_BODY_BYTES = 2 << 20  # the default --max-body-bytes of both servers: a replica must take whatever its gateway forwards
HEAD_TIMEOUT_S = 10.0
KEEP_ALIVE_S = 5.0
DESCRIPTORS_KEPT_BACK = 256  # for upstream connections, files, the model's own needs


def max_connections(wanted: int = 10_000) -> int:
    """Raise the soft descriptor limit to the hard one, and cap connections safely below it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # a container that forbids it: live within the soft limit
            pass
    return max(16, min(wanted, (soft - DESCRIPTORS_KEPT_BACK) // 2))  # a proxied request holds two


class HeadGuard:
    """The deadline for each request head and the cap on connections, for either of uvicorn's protocols (a mixin:
    first in the bases, so its methods wrap the protocol's). ``_head_incomplete`` says whether a head is still due."""

    head_timeout_s = HEAD_TIMEOUT_S
    connection_cap = 10_000
    _head_deadline: asyncio.TimerHandle | None = None

    def _head_incomplete(self) -> bool:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        if len(self.connections) > self.connection_cap:  # type: ignore[attr-defined]
            log.warning("refusing a connection: %d open, the cap is %d", len(self.connections), self.connection_cap)  # type: ignore[attr-defined]
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_late)  # type: ignore[attr-defined]

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if self._head_incomplete() and not self.transport.is_closing():  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]  # the head never arrived whole: nothing was started for it

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():  # type: ignore[attr-defined]
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


class GuardedH11Protocol(HeadGuard, H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head and a cap on connections (h11 bounds the head)."""

    def _head_incomplete(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:
            self._disarm()  # the head is in; the body and the response have their own timeouts


def server_config(app: Any, host: str, port: int, log_level: str = "warning", parser: str = "h11", **kwargs: Any) -> uvicorn.Config:
    """The uvicorn settings both servers use (and their tests), with the limits above; ``parser`` "httptools" keeps
    them on uvicorn's httptools protocol instead (lorafleet/http_guard_httptools.py).

    Each server gets its own protocol class, so its limits are its own (tests run several servers
    in one process and tighten one of them).
    """
    if parser == "httptools":
        from lorafleet.http_guard_httptools import GuardedHttpToolsProtocol

        protocol = type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), {"connection_cap": max_connections()})
    else:
        protocol = type("GuardedH11Protocol", (GuardedH11Protocol,), {"connection_cap": max_connections()})
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol,
                          h11_max_incomplete_event_size=MAX_HEAD_BYTES, timeout_keep_alive=KEEP_ALIVE_S, **kwargs)


def head_too_large(scope: dict) -> str | None:
    """Why a request's head is refused (431), or None. A head that arrives in one read is complete
    before h11's incomplete-event bound can act, so the size is checked again on the parsed request."""
    size = len(scope.get("raw_path") or scope["path"]) + len(scope.get("query_string", b""))
    size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
    if size > MAX_HEAD_BYTES:
        return f"the request line and headers are {size} bytes; at most {MAX_HEAD_BYTES} are accepted"
    return None
