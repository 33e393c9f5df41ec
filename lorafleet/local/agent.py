"""The local node agent: plays kubelet and the endpoint controller for lorafleet's own Deployments.

Each replica of a replica Deployment becomes a ``lorafleet serve`` process on its own loopback
address (127.0.0.2, 127.0.0.3, …, all on the container's port), published as a Pod whose
``status.podIP`` is that address and whose Ready condition follows its ``/health`` as its
readinessProbe says (lorafleet/local/readiness.py); each Service gets an EndpointSlice of its ready
pods (pod names as targetRef, as the gateway expects); each gateway Deployment becomes one
``lorafleet gateway`` process on the port ``lorafleet up`` was given. Crashed processes are
restarted, scale changes followed, a changed pod template rolls the processes, and everything
started is stopped on exit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import random
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lorafleet.local.readiness import Readiness

log = logging.getLogger(__name__)
SELECTOR = "app.kubernetes.io/name=lorafleet"


@dataclass
class LocalPod:
    name: str
    deployment: str
    address: str
    port: int
    template_hash: str
    process: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    volumes: list[tuple[dict, Path]] = field(default_factory=list)  # (a Secret volume, this pod's copy of it), refreshed each round
    readiness: Readiness = field(default_factory=Readiness)  # from the container's readinessProbe, as a kubelet keeps it
    restarts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def ready(self) -> bool:
        return self.readiness.ready


class NodeAgent:
    def __init__(self, kube: Any, workdir: Path, adapter_root: Path | None, gateway_port: int, kubeconfig: Path,
                 namespace: str = "default", interval: float = 0.5) -> None:
        self.kube = kube  # lorafleet.operator.kube.Kube
        self.workdir = workdir
        self.adapter_root = adapter_root
        self.gateway_port = gateway_port
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.interval = interval
        self.pods: dict[str, LocalPod] = {}
        self.free_addresses = [f"127.0.0.{i}" for i in range(2, 250)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events: list[str] = []  # what it did, for `lorafleet up` to print
        self._published: dict[tuple[str, str, str], dict] = {}  # the last status or slice written per object

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorafleet-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        for pod in list(self.pods.values()):
            self._kill(pod)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except Exception as exc:  # the API restarting, a transient error: try again next round
                log.warning("node agent: %s", exc)
            self._stop.wait(self.interval)

    # -- one round ------------------------------------------------------------------------------

    def sync(self) -> None:
        deployments = {d["metadata"]["name"]: d for d in self.kube.list("apps/v1", "Deployment", self.namespace, SELECTOR)}
        for pod in list(self.pods.values()):
            deployment = deployments.get(pod.deployment)
            if deployment is None or pod.template_hash != template_hash(deployment):
                self._remove(pod, "its Deployment changed" if deployment else "its Deployment is gone")
                continue
            if pod.process.poll() is not None:
                self._restart(pod)
            for volume, folder in pod.volumes:  # as the kubelet refreshes a mounted Secret (a rotated key, a new policy)
                self._write_secret_volume(volume, folder)
        for name, deployment in deployments.items():
            mine = [p for p in self.pods.values() if p.deployment == name]
            wanted = deployment["spec"].get("replicas", 1)
            for _ in range(wanted - len(mine)):
                self._launch(deployment)
            for pod in sorted(mine, key=lambda p: p.started, reverse=True)[: max(0, len(mine) - wanted)]:
                self._remove(pod, "scaled down")
        self._probe()
        self._publish(deployments)

    def _launch(self, deployment: dict) -> None:
        name = deployment["metadata"]["name"]
        component = deployment["metadata"]["labels"].get("app.kubernetes.io/component")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        pod_name = f"{name}-{''.join(random.choices(string.ascii_lowercase + string.digits, k=5))}"
        volumes = self._secret_volumes(deployment["spec"]["template"]["spec"], container, self.workdir / pod_name / "volumes")
        if volumes is None:
            return  # a Secret it mounts does not exist yet: a kubelet waits too
        if component == "gateway":
            address, port = "127.0.0.1", self.gateway_port
        else:
            address, port = self.free_addresses.pop(0), int(container["ports"][0]["containerPort"])
        args = local_args(mounted_paths(container["args"], {mount: folder for mount, (_, folder) in volumes.items()}),
                          address, port, self.workdir / pod_name, self.adapter_root)
        env = {**os.environ, **self._secret_env(container), "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1"}
        log_path = self.workdir / f"{pod_name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", *args], env=env, stdout=log_path.open("ab"),
                                   stderr=subprocess.STDOUT, start_new_session=True)
        pod = LocalPod(pod_name, name, address, port, template_hash(deployment), process, log_path, env, volumes=list(volumes.values()),
                       readiness=Readiness.from_container(container))
        self.pods[pod_name] = pod
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        self.kube.apply({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "namespace": self.namespace, "labels": labels},
                         "spec": {"containers": [{**container, "args": container["args"]}], "nodeName": "lorafleet-local"}})
        self._note(f"started {pod_name} on {address}:{port}")

    def _secret_volumes(self, pod_spec: dict, container: dict, root: Path) -> dict[str, tuple[dict, Path]] | None:
        """``{mountPath: (volume, this pod's folder)}`` for the container's Secret volumes, written; None while a Secret is missing."""
        volumes = {v["name"]: v for v in pod_spec.get("volumes") or [] if "secret" in v}
        mounted = {}
        for mount in container.get("volumeMounts") or []:
            volume = volumes.get(mount["name"])
            if volume is None:
                continue
            folder = root / mount["name"]
            if not self._write_secret_volume(volume, folder):
                return None
            mounted[mount["mountPath"]] = (volume, folder)
        return mounted

    def _write_secret_volume(self, volume: dict, folder: Path) -> bool:
        """The Secret's items as files in ``folder``, each replaced whole (a reader sees the old or the new, never half) and
        only when it changed; False when the Secret does not exist."""
        secret = self.kube.get("v1", "Secret", self.namespace, volume["secret"]["secretName"])
        if secret is None:
            return False
        data = secret.get("data") or {}
        items = volume["secret"].get("items") or [{"key": k, "path": k} for k in data]
        folder.mkdir(parents=True, exist_ok=True)
        for item in items:
            if item["key"] not in data:
                continue
            content, target = base64.b64decode(data[item["key"]]), folder / item["path"]
            if not target.is_file() or target.read_bytes() != content:
                staged = target.with_name(f".{target.name}.new")
                staged.write_bytes(content)
                os.replace(staged, target)
        return True

    def _secret_env(self, container: dict) -> dict[str, str]:
        """The container's variables that come from Secrets (the admin token, an HF token), as a kubelet
        would set them. Plain values are left out: they name the container's paths (/data), not this machine's."""
        env = {}
        for entry in container.get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if not ref:
                continue
            secret = self.kube.get("v1", "Secret", self.namespace, ref["name"]) or {}
            encoded = (secret.get("data") or {}).get(ref["key"])
            if encoded is not None:
                env[entry["name"]] = base64.b64decode(encoded).decode()
        return env

    def _restart(self, pod: LocalPod) -> None:
        pod.restarts += 1
        pod.readiness.exited()
        self._note(f"{pod.name} exited with {pod.process.returncode}; restarting (restart {pod.restarts})")
        pod.process = subprocess.Popen(pod.process.args, env=pod.env,
                                       stdout=pod.log_path.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        pod.started = time.monotonic()

    def _remove(self, pod: LocalPod, why: str) -> None:
        self._kill(pod)
        del self.pods[pod.name]
        if pod.address != "127.0.0.1":
            self.free_addresses.insert(0, pod.address)
        self.kube.delete("v1", "Pod", self.namespace, pod.name)
        self._published.pop(("Pod", pod.name, ""), None)
        self._note(f"stopped {pod.name} ({why})")

    @staticmethod
    def _kill(pod: LocalPod) -> None:
        if pod.process.poll() is None:
            pod.process.terminate()
            try:
                pod.process.wait(10)
            except subprocess.TimeoutExpired:
                pod.process.kill()
                pod.process.wait(5)

    def _probe(self) -> None:
        for pod in self.pods.values():
            if pod.process.poll() is not None:
                pod.readiness.exited()
                continue
            now = time.monotonic()
            if not pod.readiness.due(now):
                continue
            try:
                answered = httpx.get(f"http://{pod.address}:{pod.port}/health", timeout=pod.readiness.timeout_s).status_code == 200
            except httpx.HTTPError:
                answered = False
            pod.readiness.record(answered, now)

    def _publish(self, deployments: dict[str, dict]) -> None:
        """Pod statuses, Deployment statuses and EndpointSlices, written only when they change."""
        for pod in self.pods.values():
            self._write_status("v1", "Pod", pod.name, {
                "phase": "Running" if pod.process.poll() is None else "Failed", "podIP": pod.address, "hostIP": "127.0.0.1",
                "conditions": [{"type": "Ready", "status": "True" if pod.ready else "False"}],
                "containerStatuses": [{"name": "lorafleet", "ready": pod.ready, "restartCount": pod.restarts}]})
        for name, deployment in deployments.items():
            mine = [p for p in self.pods.values() if p.deployment == name]
            ready = sum(p.ready for p in mine)
            self._write_status("apps/v1", "Deployment", name, {
                "replicas": len(mine), "readyReplicas": ready, "updatedReplicas": len(mine), "availableReplicas": ready,
                "observedGeneration": deployment["metadata"].get("generation", 1)}, deployment["metadata"].get("uid", ""))
        for service in self.kube.list("v1", "Service", self.namespace, SELECTOR):
            selector = service["spec"].get("selector") or {}
            members = [p for p in sorted(self.pods.values(), key=lambda p: p.name)
                       if all(pod_labels(deployments.get(p.deployment)).get(k) == v for k, v in selector.items())]
            port = members[0].port if members else service["spec"]["ports"][0]["port"]
            endpoints = [{"addresses": [p.address], "conditions": {"ready": p.ready},
                          "targetRef": {"kind": "Pod", "name": p.name, "namespace": self.namespace}} for p in members]
            meta = service["metadata"]
            self._write_slice({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
                             "metadata": {"name": f"{meta['name']}-local", "namespace": self.namespace,
                                          "labels": {**(meta.get("labels") or {}), "kubernetes.io/service-name": meta["name"]},
                                          "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"], "uid": meta["uid"]}]},
                             "endpoints": endpoints, "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})

    def _write_status(self, api_version: str, kind: str, name: str, status: dict, uid: str = "") -> None:
        """Write a status only when it differs from what this agent last wrote to that object (rounds run
        twice a second); the uid keeps a re-created object of the same name from inheriting the memory."""
        key = (kind, name, uid)
        if self._published.get(key) != status:
            self.kube.merge_status(api_version, kind, self.namespace, name, status)
            self._published[key] = status

    def _write_slice(self, endpoint_slice: dict) -> None:
        key = ("EndpointSlice", endpoint_slice["metadata"]["name"], "")
        if self._published.get(key) != endpoint_slice:
            self.kube.apply(endpoint_slice)
            self._published[key] = endpoint_slice

    def _note(self, message: str) -> None:
        log.info("node agent: %s", message)
        self.events.append(message)


def pod_labels(deployment: dict | None) -> dict:
    return ((deployment or {}).get("spec", {}).get("template", {}).get("metadata", {}) or {}).get("labels", {}) or {}


def template_hash(deployment: dict) -> str:
    return hashlib.sha256(json.dumps(deployment["spec"]["template"], sort_keys=True).encode()).hexdigest()[:12]


def mounted_paths(args: list[str], mounts: dict[str, Path]) -> list[str]:
    """The container's arguments with paths under a mounted volume pointing at this pod's copy of it."""
    out = []
    for arg in args:
        mount = next((m for m in mounts if arg == m or arg.startswith(m.rstrip("/") + "/")), None)
        out.append(str(mounts[mount]) + arg[len(mount.rstrip("/")):] if mount is not None else arg)
    return out


def local_args(args: list[str], address: str, port: int, pod_dir: Path, adapter_root: Path | None) -> list[str]:
    """The container's arguments, bound to this pod's loopback address and to folders on this machine.

    Appended, never edited: argparse takes the last value of a flag, so these win whatever spelling the operator
    used (``--port=8080`` included), and the operator's list needs no parsing here (it was cut by flag name)."""
    out = [*args, "--host", address, "--port", str(port)]
    if out and out[0] == "gateway":
        out += ["--metrics-port", "0"]  # one machine, one gateway port: its /metrics on it (no cluster network to keep it in)
    if out and out[0] == "serve":
        out += ["--adapter-cache-dir", str(pod_dir / "adapters"), "--device", "cpu"]
        if adapter_root is not None:
            out += ["--adapter-root", str(adapter_root)]
    return out
