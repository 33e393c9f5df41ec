"""The gateway's proxy rules against scripted upstreams (tiny ASGI apps on loopback, no model).

Each upstream answers with its own name and what it received, or misbehaves on purpose: a 503,
an answer slower than the gateway's upstream timeout, a stream cut off halfway.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from lorafleet import ring
from lorafleet.gateway.app import create_gateway_app
from server_helpers import ThreadedApp


class Upstream(ThreadedApp):
    """Answers /health; everything else per ``mode``; counts the requests it saw."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.seen = mode, []

        async def app(scope: dict, receive, send) -> None:  # a plain function: uvicorn takes a bound method for ASGI2
            await self.answer(scope, receive, send)

        super().__init__(app)
        self.name = f"127.0.0.1:{self.port}"

    async def answer(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/health":
            return await self.reply(send, 200, b"")
        if scope["path"] in ("/info", "/adapters"):
            return await self.reply(send, 404, b"{}")
        self.seen.append(scope["path"])
        if self.mode == "unavailable":
            return await self.reply(send, 503, b'{"error": "draining"}')
        if self.mode == "slow":
            await asyncio.sleep(2.0)
        if self.mode == "cut":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]})
            await send({"type": "http.response.body", "body": b"data:1\n\n", "more_body": True})
            raise RuntimeError("the replica dies mid-stream")
        echo = {"served_by": self.name, "path": scope["path"], "query": scope["query_string"].decode(),
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]}, "body": body.decode()}
        await self.reply(send, 200, json.dumps(echo).encode(), [(b"x-upstream-header", b"kept")])

    @staticmethod
    async def reply(send, status: int, body: bytes, extra: list | None = None) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class Gateway(ThreadedApp):
    def __init__(self, upstreams: list[Upstream], **kwargs) -> None:
        super().__init__(create_gateway_app([u.url for u in upstreams], probe_interval=0.2, **kwargs))


def key_owned_by(first: Upstream, upstreams: list[Upstream]) -> str:
    """An adapter id whose top owner on the ring is ``first``."""
    names = [u.name for u in upstreams]
    return next(f"org/a{i}" for i in range(1000) if ring.owners(f"org/a{i}", names, 1)[0] == first.name)


def generate(url: str, adapter: str, **kwargs) -> httpx.Response:
    return httpx.post(url + "/generate", json={"inputs": "Hi", "parameters": {"adapter_id": adapter}}, timeout=30, **kwargs)


@pytest.mark.parametrize("mode", ["unavailable", "slow"])
def test_a_503_or_a_timeout_before_the_answer_goes_to_the_next_owner(mode: str) -> None:
    bad, good = Upstream(mode), Upstream()
    with bad, good, Gateway([bad, good], upstream_timeout=0.5) as gateway:
        adapter = key_owned_by(bad, [bad, good])
        response = generate(gateway.url, adapter)
        assert response.status_code == 200 and response.json()["served_by"] == good.name
        assert response.headers["x-lorafleet-replica"] == good.name
        assert bad.seen == ["/generate"] and good.seen == ["/generate"]  # tried once, then the next owner
        metrics = httpx.get(gateway.url + "/metrics").text
        outcome = "unavailable" if mode == "unavailable" else "connect_error"
        assert f'lorafleet_gateway_requests_total{{outcome="{outcome}",replica="{bad.name}"}} 1.0' in metrics
        assert "lorafleet_gateway_retries_total 1.0" in metrics


def test_every_replica_unavailable_is_a_503_with_a_reason() -> None:
    a, b = Upstream("unavailable"), Upstream("unavailable")
    with a, b, Gateway([a, b]) as gateway:
        response = generate(gateway.url, "org/x")
        # The last owner's own 503 is passed through rather than replaced: it says why.
        assert response.status_code == 503 and response.json() == {"error": "draining"}
        assert sorted(a.seen + b.seen) == ["/generate", "/generate"]


def test_a_stream_cut_off_midway_is_never_replayed() -> None:
    cut, good = Upstream("cut"), Upstream()
    with cut, good, Gateway([cut, good]) as gateway:
        adapter = key_owned_by(cut, [cut, good])
        body = {"inputs": "Hi", "parameters": {"adapter_id": adapter}}
        with pytest.raises(httpx.RemoteProtocolError):  # the client sees the cut...
            with httpx.stream("POST", gateway.url + "/generate_stream", json=body, timeout=30) as response:
                assert response.headers["x-lorafleet-replica"] == cut.name
                b"".join(response.iter_raw())
        assert cut.seen == ["/generate_stream"] and good.seen == []  # ...and nothing was sent again


def test_bytes_headers_and_query_pass_through_untouched() -> None:
    upstream = Upstream()
    with upstream, Gateway([upstream]) as gateway:
        raw = b'{"inputs": "Hi",   "parameters": {"adapter_id": "org/a"}}'  # odd spacing survives byte for byte
        response = httpx.post(gateway.url + "/generate?trace=1", content=raw,
                              headers={"content-type": "application/json", "x-request-id": "abc-123"}, timeout=30)
        echo = response.json()
        assert echo["body"] == raw.decode() and echo["query"] == "trace=1" and echo["path"] == "/generate"
        assert echo["headers"]["x-request-id"] == "abc-123" and echo["headers"]["host"] == upstream.name
        assert echo["headers"]["content-length"] == str(len(raw))
        assert response.headers["x-upstream-header"] == "kept"


def test_an_oversized_body_is_413_and_never_reaches_a_replica() -> None:
    upstream = Upstream()
    with upstream, Gateway([upstream], max_body_bytes=1000) as gateway:
        response = httpx.post(gateway.url + "/generate", json={"inputs": "x" * 2000}, timeout=30)
        assert response.status_code == 413 and response.json()["error_type"] == "validation"
        assert upstream.seen == []
