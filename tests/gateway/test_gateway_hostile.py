"""Malformed and hostile input at the gateway: each gets its status; none leaks a count, a credential, or the process.

Raw bytes go over a socket, so requests no well-behaved client would send (a 100 KB header, a
trailing space in a header value, a request line of garbage) are sent as an attacker would. After
every case the gateway is healthy, no replica is left with a request counted in flight, and a
normal request still works.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from support.upstream import Gateway, Upstream

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

OK_BODY = b'{"inputs": "Hi", "parameters": {"adapter_id": "org/a"}}'


def raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10.0) -> tuple[int, bytes]:
    """Send bytes as they are; return the status code and body (0 when the server closed without answering)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        data = b""
        try:
            sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):  # refused before it was all sent: read the answer
            pass
        try:
            while chunk := sock.recv(65536):
                data += chunk
                if b"\r\n\r\n" in data:
                    headers = data.split(b"\r\n\r\n", 1)[0].lower()
                    length = next((int(line.split(b":")[1]) for line in headers.split(b"\r\n") if line.startswith(b"content-length:")), None)
                    if length is not None and len(data.split(b"\r\n\r\n", 1)[1]) >= length:
                        break
        except (TimeoutError, ConnectionResetError):
            pass
    if not data:
        return 0, b""
    return int(data.split(b" ", 2)[1]), data.split(b"\r\n\r\n", 1)[-1]


def post(path: bytes, body: bytes = OK_BODY, extra: bytes = b"") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\nConnection: close\r\n"
            + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


# (name, request bytes, expected status); a body of None means the request bytes hold everything
RAW_CASES = [
    ("trailing space in a header value", post(b"/generate", extra=b"X-Team: blue \r\n"), 200),
    ("tab-padded header value", post(b"/generate", extra=b"X-Team:\tblue\t\r\n"), 200),
    ("100 KB header", post(b"/generate", extra=b"X-Big: " + b"a" * 100_000 + b"\r\n"), 431),
    ("8,000 headers", post(b"/generate", extra=b"".join(b"X-H%d: v\r\n" % i for i in range(8000))), 431),
    ("100 KB path", post(b"/" + b"p" * 100_000), (400, 431)),  # httptools' URL parser stops at 64 KiB (400); h11 reads it whole (431)
    ("16 MB header", post(b"/generate", extra=b"X-Big: " + b"a" * (16 << 20) + b"\r\n"), 431),
    ("10 KB path", post(b"/" + b"p" * 10_000), 200),
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
    ("header without a colon", b"POST /generate HTTP/1.1\r\nHost: gw\r\nnocolon\r\nContent-Length: 0\r\n\r\n", 400),
    ("content-length not a number", b"POST /generate HTTP/1.1\r\nHost: gw\r\nContent-Length: ten\r\n\r\n", 400),
    ("content-length negative", b"POST /generate HTTP/1.1\r\nHost: gw\r\nContent-Length: -5\r\n\r\n", 400),
    ("two different content-lengths", b"POST /generate HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}", 400),
    ("content-length and chunked", b"POST /generate HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", (0, 400)),
    ("bad chunk size", b"POST /generate HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n", 400),
    ("HTTP/1.0 without Host", b"POST /generate HTTP/1.0\r\nContent-Length: " + str(len(OK_BODY)).encode() + b"\r\n\r\n" + OK_BODY, 200),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    ("NUL in a header value", post(b"/generate", extra=b"X-Team: a\x00b\r\n"), 400),
    ("chunked body over the limit", b"POST /generate HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
     + (b"%x\r\n" % 8192 + b"x" * 8192 + b"\r\n") * 3 + b"0\r\n\r\n", 413),
    ("declared body over the limit", b"POST /generate HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 999999\r\n\r\n", 413),
    ("body is not JSON", post(b"/generate", body=b"{not json"), 200),
    ("body is a JSON list", post(b"/generate", body=b"[1, 2]"), 200),
    ("nesting bomb", post(b"/generate", body=b'{"parameters": ' + b"[" * 5000 + b"]" * 5000 + b"}"), 200),
    ("lone surrogate adapter id", post(b"/generate", body=b'{"inputs": "x", "parameters": {"adapter_id": "\\ud800"}}'), 200),
    ("lone surrogate model", post(b"/v1/completions", body=b'{"prompt": "x", "model": "\\udfff"}'), 200),
    ("adapter id a number", post(b"/generate", body=b'{"inputs": "x", "parameters": {"adapter_id": 7}}'), 200),
    ("adapter id of 10 KB", post(b"/generate", body=json.dumps({"inputs": "x", "parameters": {"adapter_id": "a" * 10_000}}).encode()), 200),
    ("merged ids not strings", post(b"/generate", body=b'{"inputs": "x", "parameters": {"merged_adapters": {"ids": [1, null, {}]}}}'), 200),
    ("model an object", post(b"/v1/chat/completions", body=b'{"model": {"id": 1}, "messages": []}'), 200),
    ("admin load", post(b"/adapters", body=b'{"adapter_id": "x", "pin": true}'), 403),
    ("admin unload", b"DELETE /adapters/x HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 403),
    ("admin listing", b"GET /adapters?tier=device HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 403),
    ("admin path with a trailing slash", post(b"/adapters/", body=b"{}"), 403),
    ("unknown path", b"GET /no/such/path?q=%00%ff HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n", 200),
    ("PUT on a generate route", b"PUT /generate HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}", 200),
]


@pytest.fixture(scope="module")
def fleet():
    upstream = Upstream()
    with upstream, Gateway([upstream], max_body_bytes=16_384) as gateway:
        yield gateway, upstream


def assert_unharmed(gateway: Gateway) -> None:
    assert httpx.get(gateway.url + "/health").status_code == 200
    replicas = httpx.get(gateway.url + "/replicas").json()["replicas"]
    assert all(r["in_flight"] == 0 for r in replicas), replicas
    assert httpx.post(gateway.url + "/generate", content=OK_BODY, headers={"content-type": "application/json"}, timeout=30).status_code == 200


def test_a_head_too_large_is_431_however_many_reads_it_arrives_in(fleet) -> None:
    """The same 100 KB head sent whole and in pieces a moment apart (as a loaded machine may deliver it)."""
    gateway, upstream = fleet
    seen = len(upstream.seen)
    head = post(b"/generate", extra=b"X-Big: " + b"a" * 100_000 + b"\r\n")
    for pieces in (1, 4):
        size = -(-len(head) // pieces)
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            try:
                for i in range(pieces):
                    sock.sendall(head[i * size:(i + 1) * size])
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):  # refused before the rest was sent
                pass
            answer = sock.makefile("rb").read()
        assert answer.startswith(b"HTTP/1.1 431 "), (pieces, answer[:200])
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error_type"] == "validation"
    assert len(upstream.seen) == seen  # never reached a replica
    assert_unharmed(gateway)


@pytest.mark.parametrize("name,request_bytes,status", RAW_CASES, ids=[c[0] for c in RAW_CASES])
def test_hostile_bytes(fleet, name: str, request_bytes: bytes, status: int | tuple[int, ...]) -> None:
    gateway, upstream = fleet
    seen = len(upstream.seen)
    got, body = raw_request(gateway.port, request_bytes)
    assert got in (status if isinstance(status, tuple) else (status,)), body[:300]
    if status in (403, 413, 431):
        assert json.loads(body)["error_type"] in ("forbidden", "validation")
        assert len(upstream.seen) == seen  # never reached a replica
    assert_unharmed(gateway)


def test_there_are_at_least_thirty_gateway_cases() -> None:
    assert len(RAW_CASES) >= 30


def test_credentials_and_cookies_stop_at_the_gateway(fleet) -> None:
    gateway, _ = fleet
    headers = {"authorization": "Bearer client-key", "proxy-authorization": "Basic x", "cookie": "session=1", "x-request-id": "r1"}
    echo = httpx.post(gateway.url + "/generate", content=OK_BODY, headers=headers, timeout=30).json()
    assert "authorization" not in echo["headers"] and "proxy-authorization" not in echo["headers"] and "cookie" not in echo["headers"]
    assert echo["headers"]["x-request-id"] == "r1"


def test_a_head_that_trickles_in_is_cut_off(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, _ = fleet
    monkeypatch.setattr(gateway.server.config.http_protocol_class, "head_timeout_s", 0.5)
    with socket.create_connection(("127.0.0.1", gateway.port), timeout=5) as sock:
        sock.sendall(b"POST /generate HTTP/1.1\r\nHost: gw\r\n")
        started = time.monotonic()
        for _ in range(20):  # one header line every 0.1 s: never a whole head
            try:
                sock.sendall(b"X-Slow: 1\r\n")
            except OSError:
                break
            time.sleep(0.1)
        sock.settimeout(2)
        try:
            closed = sock.recv(1024) == b""
        except (TimeoutError, ConnectionResetError):
            closed = True
    assert closed and time.monotonic() - started < 2.5
    assert_unharmed(gateway)


def test_connections_over_the_cap_are_closed_at_once(fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, _ = fleet
    monkeypatch.setattr(gateway.server.config.http_protocol_class, "connection_cap", 5)
    idle = [socket.create_connection(("127.0.0.1", gateway.port), timeout=5) for _ in range(5)]
    try:
        time.sleep(0.2)
        extra = socket.create_connection(("127.0.0.1", gateway.port), timeout=5)
        extra.settimeout(2)
        try:
            assert extra.recv(1024) == b""  # closed without a word
        except ConnectionResetError:
            pass
        extra.close()
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.2)
    assert_unharmed(gateway)
