"""Running the embedded API on a loopback port in its own thread, with a kubeconfig pointing at it."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import aiohttp.web

from lorafleet.local.kubeapi.server import KubeAPI


class EmbeddedKubeAPI:
    """``with EmbeddedKubeAPI(port=0) as api: ...`` — api.url, api.kubeconfig, api.handler (the KubeAPI)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, crds: list[dict] | None = None) -> None:
        self.host, self.port = host, port
        self.handler: KubeAPI | None = None
        self._crds = crds or []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def write_kubeconfig(self, path: Path, namespace: str = "default") -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "lorafleet",
            "clusters": [{"name": "lorafleet", "cluster": {"server": self.url}}],
            "contexts": [{"name": "lorafleet", "context": {"cluster": "lorafleet", "user": "lorafleet", "namespace": namespace}}],
            "users": [{"name": "lorafleet", "user": {"token": "lorafleet-local"}}],
        }, indent=2))
        return path

    def start(self) -> EmbeddedKubeAPI:
        self._thread = threading.Thread(target=self._run, name="lorafleet-kubeapi", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> EmbeddedKubeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, fn, *args):  # noqa: ANN001, ANN201
        """Run ``fn(*args)`` on the API's event loop (the store is not thread-safe) and return its result."""
        assert self._loop is not None
        future = asyncio.run_coroutine_threadsafe(self._call(fn, *args), self._loop)
        return future.result(10)

    @staticmethod
    async def _call(fn, *args):  # noqa: ANN001, ANN205
        return fn(*args)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # surfaced to start()
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.handler = KubeAPI()
        crd_resource = self.handler.registry.by_key[("apiextensions.k8s.io", "customresourcedefinitions")]
        for crd in self._crds:
            self.handler.store.create(crd_resource, None, crd)
        server = aiohttp.web.Server(self.handler)
        runner = aiohttp.web.ServerRunner(server, handle_signals=False)
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, self.host, self.port, shutdown_timeout=1)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # the port actually bound (port 0 picks one)
        self._ready.set()
        await self._stopped.wait()
        await runner.cleanup()
