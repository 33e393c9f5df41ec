"""Stub replicas that record the operator's /adapters calls, a stand-in kubelet, and the operator running against the embedded API."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import kopf
import yaml
from kopf.testing import KopfRunner
from kubernetes import client, config

from lorafleet.adapter_ref import AdapterRef
from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.handlers import register
from lorafleet.traffic_split import VersionCounts

ROOT = Path(__file__).resolve().parents[2]
BASEMODEL = """
apiVersion: lorafleet.io/v1alpha1
kind: BaseModel
metadata: {name: smol}
spec:
  model: {id: smollm2, source: local}
  replicas: 2
  engine: {maxLoraRank: 16}
"""


def adapter(name: str, adapter_id: str, base: str = "smol", source: str = "local", warm: int = 1) -> str:
    return yaml.safe_dump({"apiVersion": "lorafleet.io/v1alpha1", "kind": "Adapter", "metadata": {"name": name},
                           "spec": {"baseModel": base, "id": adapter_id, "source": source, "warmReplicas": warm}})


def custom(api, plural: str, name: str) -> dict:
    return client.CustomObjectsApi(api).get_namespaced_custom_object("lorafleet.io", "v1alpha1", "default", plural, name)


def digest(ring_key: str) -> str:
    """The content digest a stub replica reports for a version (a real one hashes the weights it loaded)."""
    return "blake2b:" + hashlib.blake2b(ring_key.encode(), digest_size=16).hexdigest()


class StubReplica:
    """Answers /health and /adapters like a replica, remembering what it was asked to load and unload."""

    def __init__(self, address: str, keep_alive: bool = False) -> None:
        """``keep_alive``: answer over kept-alive connections as uvicorn does (a bench's many calls); tests keep one connection
        per call, so that a closed stand-in stops answering at once."""
        self.loaded: dict[str, bool] = {}  # ring key (id, @revision when pinned to one) -> pinned
        self.refs: dict[str, AdapterRef] = {}  # ring key -> the version loaded, as a replica lists it
        self.calls: list[tuple[str, str]] = []  # ("load" | "unload", ring key)
        self.answered: dict[tuple[str, str], float] = {}  # call -> when it was first answered (time.monotonic)
        self.listings = 0  # GET /adapters answered
        self.slow: dict[str, float] = {}  # adapter id (or id@revision) → seconds its load takes
        self.catalogue: list[dict] = []  # what the operator registered (PUT /adapters/catalogue)
        self.catalogue_delay = 0.0  # seconds a PUT of the catalogue takes before it is held
        self.catalogues: list[tuple[float, list[dict]]] = []  # (when held, what): every catalogue it was sent
        self.counts: dict[str, VersionCounts] = {}  # ring key -> the outcomes GET /adapters/stats reports (the test's traffic)
        self.metrics: str | Callable[[], str] = ""  # what GET /metrics answers (the autoscaler's signals), or what makes it each read
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1" if keep_alive else "HTTP/1.0"
            disable_nagle_algorithm = True  # headers and body go out in two writes: Nagle would hold the body for the peer's delayed ACK

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
                if self.path.startswith("/adapters/stats"):
                    asked = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query).get("version", [])
                    return self._reply(200, {"versions": {v: stub.counts[v].wire() for v in asked if v in stub.counts}})
                if self.path == "/metrics":
                    data = (stub.metrics() if callable(stub.metrics) else stub.metrics).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain; version=0.0.4")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    return self.wfile.write(data)
                if self.path == "/adapters":
                    stub.listings += 1
                    return self._reply(200, [{**stub.refs[a].entry(a), "key": stub.refs[a].key, "tier": "device", "pinned": p, "digest": digest(a)}
                                             for a, p in list(stub.loaded.items())])
                self._reply(200, {})

            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                ref = AdapterRef.parse(request["adapter_id"], request.get("adapter_source") or "hub", request.get("revision"))
                stub.calls.append(("load", ref.ring_key))
                time.sleep(stub.slow.get(ref.ring_key, stub.slow.get(request["adapter_id"], 0.0)))
                if request["adapter_id"].startswith("refused/"):
                    return self._reply(424, {"error": "not a LoRA for this base", "error_type": "generation"})
                stub.refs[ref.ring_key] = ref
                stub.loaded[ref.ring_key] = request.get("pin", False)
                stub.answered.setdefault(("load", ref.ring_key), time.monotonic())
                self._reply(200, {"id": ref.id, "key": ref.key, "tier": "device", "pinned": request.get("pin", False), "digest": digest(ref.ring_key)})

            def do_PUT(self) -> None:
                sent = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))["adapters"]
                time.sleep(stub.catalogue_delay)
                stub.catalogue = sent
                stub.catalogues.append((time.monotonic(), sent))
                self._reply(200, {"adapters": len(stub.catalogue)})

            def do_DELETE(self) -> None:
                named = urllib.parse.unquote(self.path.removeprefix("/adapters/"))  # a key or an id, as a replica takes
                for adapter in [a for a, ref in list(stub.refs.items()) if named in (ref.key, ref.id)] or [named]:
                    stub.calls.append(("unload", adapter))
                    stub.loaded.pop(adapter, None)
                    stub.answered.setdefault(("unload", adapter), time.monotonic())
                self._reply(200, {"unloaded": [named]})

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
                     otlp_endpoint: str | None = "http://otel-collector:4318", tenant_key_poll_s: float = 3600.0) -> Iterator[client.ApiClient]:
    """The CRDs applied and the operator (kopf, in this process) running against the embedded API.

    The safety net defaults to an hour: what the tests see is done by events alone. The operator has a
    default tracing endpoint (its --otlp-endpoint), which BaseModels without their own inherit.
    """
    kubectl("apply", "-k", str(ROOT / "crds"))
    monkeypatch.setenv("KUBECONFIG", str(kube_api.kubeconfig))
    api = config.new_client_from_config(str(kube_api.kubeconfig))
    settings = kopf.OperatorSettings()
    settings.watching.server_timeout = 10
    registry = register(kopf.OperatorRegistry(), OperatorConfig(residency_check_s=residency_check_s, status_interval=0.5, otlp_endpoint=otlp_endpoint,
                                                                       tenant_key_poll_s=tenant_key_poll_s))
    with KopfRunner(["run", "--standalone", "--namespace", "default"], registry=registry, settings=settings):
        yield api
