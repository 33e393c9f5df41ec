"""A stand-in Kubernetes API on loopback serving only EndpointSlices (list and watch), for the gateway's discovery.

Real enough for the ``kubernetes`` client: typed list responses with resourceVersion, and
watch streams of JSON lines that the test feeds by changing the slices.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route


class KubeStandIn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.slices: dict[str, dict] = {}
        self.version = 1
        self.watchers: list[asyncio.Queue] = []
        self.loop: asyncio.AbstractEventLoop | None = None

        async def endpointslices(request: Request):
            self.loop = asyncio.get_running_loop()
            if request.query_params.get("watch") in ("true", "1"):
                queue: asyncio.Queue = asyncio.Queue()
                self.watchers.append(queue)

                async def stream():
                    try:
                        while True:
                            try:
                                event = await asyncio.wait_for(queue.get(), timeout=float(request.query_params.get("timeoutSeconds", 30)))
                            except asyncio.TimeoutError:
                                return
                            yield (json.dumps(event) + "\n").encode()
                    finally:
                        self.watchers.remove(queue)

                return StreamingResponse(stream(), media_type="application/json")
            return JSONResponse({"kind": "EndpointSliceList", "apiVersion": "discovery.k8s.io/v1",
                                 "metadata": {"resourceVersion": str(self.version)}, "items": list(self.slices.values())})

        app = Starlette(routes=[Route("/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices", endpointslices)])
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def write_kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": f"http://127.0.0.1:{self.port}"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
            "users": [{"name": "standin", "user": {"token": "unused"}}],
        }))
        return path

    def set_slice(self, name: str, endpoints: list[tuple[str, str, bool]], port: int) -> None:
        """endpoints: (pod name, address, ready)."""
        self.version += 1
        obj = {
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
            "metadata": {"name": name, "namespace": "default", "resourceVersion": str(self.version),
                         "labels": {"kubernetes.io/service-name": "fleet"}},
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            "endpoints": [{"addresses": [address], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": pod, "namespace": "default"}}
                          for pod, address, ready in endpoints],
        }
        kind = "MODIFIED" if name in self.slices else "ADDED"
        self.slices[name] = obj
        if self.loop is not None:
            for queue in list(self.watchers):
                self.loop.call_soon_threadsafe(queue.put_nowait, {"type": kind, "object": obj})

    def __enter__(self) -> "KubeStandIn":
        self.thread.start()
        while not self.server.started:
            threading.Event().wait(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
