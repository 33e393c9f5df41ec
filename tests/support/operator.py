"""Stub replicas that record the operator's /adapters calls, and a stand-in kubelet for the embedded API."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kubernetes import client


class StubReplica:
    """Answers /health and /adapters like a replica, remembering what it was asked to load and unload."""

    def __init__(self, address: str) -> None:
        self.loaded: dict[str, bool] = {}
        self.calls: list[tuple[str, str]] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: object) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/adapters":
                    return self._reply(200, [{"id": a, "tier": "device", "pinned": p} for a, p in stub.loaded.items()])
                self._reply(200, {})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                stub.calls.append(("load", request["adapter_id"]))
                if request["adapter_id"].startswith("refused/"):
                    return self._reply(424, {"error": "not a LoRA for this base", "error_type": "generation"})
                stub.loaded[request["adapter_id"]] = request.get("pin", False)
                self._reply(200, {"id": request["adapter_id"], "tier": "device", "pinned": request.get("pin", False)})

            def do_DELETE(self) -> None:
                adapter = self.path.removeprefix("/adapters/")
                stub.calls.append(("unload", adapter))
                stub.loaded.pop(adapter, None)
                self._reply(200, {"unloaded": [adapter]})

        with socket.socket() as sock:
            sock.bind((address, 0))
            port = sock.getsockname()[1]
        self.address, self.port = address, port
        self.server = ThreadingHTTPServer((address, port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def run_pod(core: client.CoreV1Api, base: str, pod: str, replica: StubReplica) -> None:
    """Play kubelet: a Ready replica pod of BaseModel ``base`` whose IP and port reach ``replica``."""
    labels = {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/instance": base, "app.kubernetes.io/component": "replica"}
    core.create_namespaced_pod("default", {
        "metadata": {"name": pod, "labels": labels},
        "spec": {"containers": [{"name": "lorafleet", "image": "x", "ports": [{"name": "http", "containerPort": replica.port}]}]},
    })
    core.patch_namespaced_pod_status(pod, "default", {"status": {"phase": "Running", "podIP": replica.address,
                                                                   "conditions": [{"type": "Ready", "status": "True"}]}})
