"""Stub replicas that record the operator's /adapters calls, a stand-in kubelet, and the operator running against the embedded API."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kopf
from kopf.testing import KopfRunner
from kubernetes import client, config

from lorafleet.operator.handlers import register

ROOT = Path(__file__).resolve().parents[2]


class StubReplica:
    """Answers /health and /adapters like a replica, remembering what it was asked to load and unload."""

    def __init__(self, address: str) -> None:
        self.loaded: dict[str, bool] = {}
        self.calls: list[tuple[str, str]] = []
        self.listings = 0  # GET /adapters answered
        self.slow: dict[str, float] = {}  # adapter id → seconds its load takes
        self.catalogue: list[dict] = []  # what the operator registered (PUT /adapters/catalogue)
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
                    stub.listings += 1
                    return self._reply(200, [{"id": a, "tier": "device", "pinned": p} for a, p in stub.loaded.items()])
                self._reply(200, {})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                stub.calls.append(("load", request["adapter_id"]))
                time.sleep(stub.slow.get(request["adapter_id"], 0.0))
                if request["adapter_id"].startswith("refused/"):
                    return self._reply(424, {"error": "not a LoRA for this base", "error_type": "generation"})
                stub.loaded[request["adapter_id"]] = request.get("pin", False)
                self._reply(200, {"id": request["adapter_id"], "tier": "device", "pinned": request.get("pin", False)})

            def do_PUT(self) -> None:
                stub.catalogue = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))["adapters"]
                self._reply(200, {"adapters": len(stub.catalogue)})

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
        self.server.daemon_threads, self.server.block_on_close = True, False  # a slow load never holds up the test's end
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


def set_pod_ready(core: client.CoreV1Api, pod: str, ready: bool, restarts: int = 0) -> None:
    status = "True" if ready else "False"
    core.patch_namespaced_pod_status(pod, "default", {"status": {
        "conditions": [{"type": "Ready", "status": status}],
        "containerStatuses": [{"name": "lorafleet", "ready": ready, "restartCount": restarts, "image": "x", "imageID": ""}]}})


@contextlib.contextmanager
def operator_running(kube_api, kubectl, monkeypatch, residency_check_s: float = 3600.0,
                     otlp_endpoint: str | None = "http://otel-collector:4318") -> Iterator[client.ApiClient]:
    """The CRDs applied and the operator (kopf, in this process) running against the embedded API.

    The safety net defaults to an hour: what the tests see is done by events alone. The operator has a
    default tracing endpoint (its --otlp-endpoint), which BaseModels without their own inherit.
    """
    kubectl("apply", "-k", str(ROOT / "crds"))
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig))
    api = config.new_client_from_config(str(kube_api.kubeconfig))
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    registry = register(kopf.OperatorRegistry(), residency_check_s=residency_check_s, status_interval=0.5, otlp_endpoint=otlp_endpoint)
    with KopfRunner(["run", "--standalone", "--namespace", "default"], registry=registry, settings=settings):
        yield api
