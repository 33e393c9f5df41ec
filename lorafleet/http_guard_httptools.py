"""The limits of lorafleet/http_limits.py on uvicorn's httptools protocol, for the gateway's hot path.

uvicorn's h11 protocol bounds a request head itself (``h11_max_incomplete_event_size``); httptools (llhttp, in C)
does not, which is why both servers first ran h11. Parsing with h11 in pure Python was most of what the gateway adds
to a request (bench/gateway_overhead.py), so here the same three limits are kept on httptools: the bytes received
while a head is incomplete are counted, and past MAX_HEAD_BYTES the connection gets a 400 and is closed before
llhttp is fed more (so the partial head held in memory is at most the bound plus one socket read); the head deadline
and the connection cap are as in GuardedH11Protocol. A head that arrives whole in one read is checked by
``head_too_large`` on the parsed request (431), as with h11.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lorafleet.http_limits import HEAD_TIMEOUT_S, MAX_HEAD_BYTES

log = logging.getLogger(__name__)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    head_timeout_s = HEAD_TIMEOUT_S
    connection_cap = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._in_head, self._head_bytes = True, 0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.connection_cap:
            log.warning("refusing a connection: %d open, the cap is %d", len(self.connections), self.connection_cap)
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_deadline = self.loop.call_later(self.head_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_late(self) -> None:
        self._head_deadline = None
        if self._in_head and not self.transport.is_closing():
            self.transport.close()  # the head never arrived whole: nothing was started for it

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self.send_400_response(f"the request head is larger than {MAX_HEAD_BYTES} bytes")

    def on_message_begin(self) -> None:  # llhttp calls it at a request's first byte
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._disarm()  # the head is in; the body and the response have their own timeouts
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
