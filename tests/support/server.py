"""A real replica server on a free loopback port, in a background thread, stopped by the fixture."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import uvicorn

from lorafleet.http_limits import server_config
from lorafleet.net import free_port
from lorafleet.server.api.app import create_app
from lorafleet.server.api.service import ReplicaService
from lorafleet.server.config import EngineConfig
from lorafleet.server.serve_config import ServeConfig


async def read_body(receive) -> bytes:  # noqa: ANN001 - an ASGI receive
    """The whole request body of an ASGI request."""
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


class ThreadedApp:
    """Any ASGI app served by uvicorn on a free loopback port in a thread, healthy on entry, stopped on exit."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # A gateway app serves with the parser its config names, as `lorafleet gateway` does.
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, parser=getattr(getattr(app, "config", None), "http_parser", "h11")))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):  # noqa: ANN204 - returns the subclass
        self.thread.start()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{type(self).__name__} did not become healthy")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)


class RunningServer(ThreadedApp):
    """A replica on the tiny model with local adapters."""

    def __init__(self, model: Path, adapter_root: Path, cache: Path, **overrides) -> None:
        engine_settings = dict(model=str(model), dtype="float32", block_size=4, kv_cache_memory=1 << 22, max_total_tokens=256, max_input_length=128,
                               adapter_roots=[adapter_root], adapter_cache_dir=cache, max_active_adapters=4, max_lora_rank=16)
        engine_settings.update(overrides.pop("engine", {}))
        # Without an admin token a test replica is a laptop's (--admin-open): its admin routes are open, as the tests of
        # loading and pinning expect; the tests of the closed default and of tokens say what they want.
        overrides.setdefault("admin_open", "admin_token" not in overrides and "warm_token" not in overrides)
        config = ServeConfig(engine=EngineConfig(**engine_settings), model_id="tiny-llama", **{"adapter_source": "local", **overrides})
        self.service = ReplicaService(config)
        super().__init__(create_app(self.service))


def running_server(model: Path, adapter_root: Path, cache: Path, **overrides) -> Iterator[RunningServer]:
    with RunningServer(model, adapter_root, cache, **overrides) as server:
        yield server


def wait_healthy(url: str, process: subprocess.Popen | None = None, timeout: float = 120) -> None:
    """Until ``url``/health answers 200; fails at once if ``process`` (the server) exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"the server at {url} exited"
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become healthy in {timeout:.0f}s")


def adapter_events(url: str) -> dict[str, float]:
    """A replica's ``lorafleet_adapter_events`` counters (device_hit, cpu_hit, local_read, ...) from its /metrics."""
    lines = httpx.get(url + "/metrics", timeout=10).text.splitlines()
    return {line.split('event="')[1].split('"')[0]: float(line.split()[-1]) for line in lines if line.startswith("lorafleet_adapter_events{")}
