"""The limits of lorafleet/http_limits.py on uvicorn's httptools protocol, for the gateway's hot path.

uvicorn's h11 protocol bounds a request head itself (``h11_max_incomplete_event_size``); httptools (llhttp, in C)
does not, which is why both servers first ran h11. h11 parses in pure Python on the gateway's hot path (a profile
shows it; bench/gateway_overhead.py measured httptools -0.30 ms p50 and 1.36x throughput in one run, within noise in
two later ones), so here the same three limits are kept on httptools: the bytes received
while a head is incomplete are counted, and past MAX_HEAD_BYTES the connection gets a 431 and is closed before
llhttp is fed more (so the partial head held in memory is at most the bound plus one socket read); the head deadline
and the connection cap are GuardedH11Protocol's (HeadGuard, lorafleet/http_limits.py). A head that arrives whole in
one read is checked by ``head_too_large`` on the parsed request, also 431: how many reads a head took depends on
the sender and the load, and the client must get one answer for one request (this guard's 400 once failed a test
whose 100 KB head arrived in two reads under the whole suite).
"""

from __future__ import annotations

import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lorafleet.http_limits import MAX_HEAD_BYTES, HeadGuard


class GuardedHttpToolsProtocol(HeadGuard, HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_head, self._head_bytes = True, 0

    def _head_incomplete(self) -> bool:
        return self._in_head

    def data_received(self, data: bytes) -> None:
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
            self._refuse_head()

    def _refuse_head(self) -> None:
        """431 with the servers' JSON error body, then close: the rest of the head is never read."""
        body = json.dumps({"error": f"the request head is larger than {MAX_HEAD_BYTES} bytes", "error_type": "validation"}).encode()
        self.transport.write(b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body))
        self.transport.close()

    def on_message_begin(self) -> None:  # llhttp calls it at a request's first byte
        super().on_message_begin()
        self._in_head = True

    def on_headers_complete(self) -> None:
        self._in_head, self._head_bytes = False, 0
        self._disarm()  # the head is in; the body and the response have their own timeouts
        super().on_headers_complete()
