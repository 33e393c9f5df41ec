"""Scripted upstreams for the gateway's tests: tiny ASGI apps on loopback that echo or misbehave, no model."""

from __future__ import annotations

import asyncio
import json

from lorafleet import ring
from lorafleet.gateway.app import create_gateway_app
from lorafleet.usage_line import usage_comment
from support.server import ThreadedApp, read_body


class Upstream(ThreadedApp):
    """Answers /health; everything else per ``mode``; counts the requests it saw."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode, self.seen = mode, []
        self.usage: list[tuple[bytes, bytes]] = []  # headers a replica states its token counts in, when a test wants them

        async def app(scope: dict, receive, send) -> None:  # a plain function: uvicorn takes a bound method for ASGI2
            await self.answer(scope, receive, send)

        super().__init__(app)
        self.name = f"127.0.0.1:{self.port}"

    async def answer(self, scope: dict, receive, send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        while self.mode == "stopped":  # SIGSTOPped: the socket accepts, nothing answers until it is resumed
            await asyncio.sleep(0.05)
        if scope["path"] == "/health":
            return await self.reply(send, 200, b"")
        if scope["path"] == "/info" or scope["path"].startswith("/adapters"):  # no lorafleet admin routes or catalogue
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
        if self.mode == "stream":  # a replica's stream: the prompt's tokens in a header, the generated ones in its closing comment
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream"), (b"x-prompt-tokens", b"3")]})
            for event in (b"data:1\n\n", b"data:2\n\n", usage_comment(2).encode() + b"data:[DONE]\n\n"):
                await send({"type": "http.response.body", "body": event, "more_body": True})
            return await send({"type": "http.response.body", "body": b""})
        echo = {"served_by": self.name, "path": scope["path"], "query": scope["query_string"].decode(),
                "headers": {k.decode(): v.decode() for k, v in scope["headers"]}, "body": body.decode()}
        await self.reply(send, 200, json.dumps(echo).encode(), [(b"x-upstream-header", b"kept"), *self.usage])

    @staticmethod
    async def reply(send, status: int, body: bytes, extra: list | None = None) -> None:
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *(extra or [])]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class CatalogueUpstream(Upstream):
    """An echoing replica that also serves the fleet's catalogue, as the operator would have put it."""

    def __init__(self, entries: list[dict]) -> None:
        self.entries = entries
        super().__init__()

    async def answer(self, scope: dict, receive, send) -> None:
        if scope.get("type") == "http" and scope["path"] == "/adapters/catalogue":
            body = json.dumps({"version": str(hash(json.dumps(self.entries))), "base": "tiny", "adapters": self.entries}).encode()
            return await self.reply(send, 200, body)
        await super().answer(scope, receive, send)


class Gateway(ThreadedApp):
    def __init__(self, upstreams: list[Upstream], **kwargs) -> None:
        super().__init__(create_gateway_app([u.url for u in upstreams], probe_interval=0.2, **kwargs))


def key_owned_by(first: Upstream, upstreams: list[Upstream]) -> str:
    """An adapter id whose top owner on the ring is ``first``."""
    names = [u.name for u in upstreams]
    return next(f"org/a{i}" for i in range(1000) if ring.owners(f"org/a{i}", names, 1)[0] == first.name)
