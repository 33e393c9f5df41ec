"""The operator at the mission's scale: 1,000 Adapters on one BaseModel, measured on real processes.

The embedded Kubernetes API and the operator run as their own processes (as `lorafleet up` runs
them); this process plays kubelet for N replica pods whose addresses reach stand-in replicas that
answer /health and /adapters without a model (tests/support/operator.py's StubReplica). One run
prints:

- seconds from the first Adapter applied until all are Ready (and the API writes that took);
- API writes per minute at rest, over ``--rest-s`` seconds (every write anywhere moves the API's
  global resourceVersion);
- after scaling the BaseModel 4 -> 5 replicas: how many adapters moved to the new pod (expect about
  1/5), and seconds from the new pod's readiness until every moved adapter is Ready on it;
- the operator's and the API's CPU seconds and the operator's peak RSS;
- what an operator restart costs: writes, replica calls and listings in its first ``--restart-s``.

Goals (issue 16): all Ready < 60 s; 0 writes/min at rest; moved adapters Ready < 10 s; RSS < 300 MB.

    .venv/bin/python -P bench/operator_scale.py [--adapters 1000] [--rest-s 120]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.operator import StubReplica  # noqa: E402

from lorafleet import ring  # noqa: E402

GROUP = "/apis/lorafleet.io/v1alpha1/namespaces/default"
REPLICA_LABELS = {"app.kubernetes.io/name": "lorafleet", "app.kubernetes.io/instance": "smol", "app.kubernetes.io/component": "replica"}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    match = re.search(r"VmHWM:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


class Cluster:
    """REST calls to the embedded API, as the kubelet and kubectl would make them."""

    def __init__(self, url: str) -> None:
        self.http = httpx.Client(base_url=url, timeout=30)

    def revision(self) -> int:
        return int(self.http.get(f"{GROUP}/adapters?limit=1").json()["metadata"]["resourceVersion"])

    def writes(self) -> Counter:
        """Writes answered so far by verb and resource, from the API's apiserver_request_total."""
        counts: Counter = Counter()
        for line in self.http.get("/metrics").text.splitlines():
            match = re.match(r'apiserver_request_total\{(.*)\} ([0-9.e+]+)$', line)
            if match:
                labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
                if labels["verb"] in ("create", "update", "patch", "delete") and labels["code"].startswith("2"):
                    resource = labels["resource"] + (f"/{labels['subresource']}" if labels["subresource"] else "")
                    counts[f"{labels['verb']} {resource}"] += int(float(match.group(2)))
        return counts

    def run_pod(self, name: str, replica: StubReplica) -> None:
        self.http.post("/api/v1/namespaces/default/pods", json={
            "metadata": {"name": name, "labels": REPLICA_LABELS},
            "spec": {"containers": [{"name": "lorafleet", "image": "x", "ports": [{"name": "http", "containerPort": replica.port}]}]}}).raise_for_status()
        self.http.patch(f"/api/v1/namespaces/default/pods/{name}/status", headers={"Content-Type": "application/merge-patch+json"},
                        json={"status": {"phase": "Running", "podIP": replica.address, "conditions": [{"type": "Ready", "status": "True"}],
                                         "containerStatuses": [{"name": "lorafleet", "ready": True, "restartCount": 0}]}}).raise_for_status()


class AdapterWatch:
    """Every Adapter's status, kept by one watch as kubectl get -w keeps it: polling a 10,000-item list every half
    second made the bench itself (and the API serving it) the busiest process of the run."""

    def __init__(self, url: str) -> None:
        self.status: dict[str, dict] = {}
        self._http = httpx.Client(base_url=url, timeout=httpx.Timeout(30, read=None))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        revision = None
        while not self._stop.is_set():
            try:
                if revision is None:
                    listing = self._http.get(f"{GROUP}/adapters").json()
                    self.status = {a["metadata"]["name"]: a.get("status") or {} for a in listing["items"]}
                    revision = listing["metadata"]["resourceVersion"]
                with self._http.stream("GET", f"{GROUP}/adapters", params={"watch": "true", "resourceVersion": revision,
                                                                           "allowWatchBookmarks": "true"}) as stream:
                    for line in stream.iter_lines():
                        event = json.loads(line)
                        if event["type"] == "ERROR":  # 410 Gone: list again
                            revision = None
                            break
                        obj = event["object"]
                        revision = obj["metadata"]["resourceVersion"]
                        if event["type"] == "DELETED":
                            self.status.pop(obj["metadata"]["name"], None)
                        elif event["type"] != "BOOKMARK":
                            self.status[obj["metadata"]["name"]] = obj.get("status") or {}
            except httpx.HTTPError:
                if not self._stop.is_set():
                    time.sleep(0.5)

    def close(self) -> None:
        self._stop.set()
        self._http.close()


def breakdown(counts: Counter) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def wait(predicate, timeout: float, interval: float = 0.5) -> float | None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--replicas", type=int, default=4, help="replicas before the scale-up (one more after)")
    parser.add_argument("--rest-s", type=float, default=120.0)
    parser.add_argument("--restart-s", type=float, default=20.0, help="how long to watch a restarted operator")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lorafleet-operator-scale-"))
    kubeconfig = work / "kubeconfig"
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PYTHONUNBUFFERED": "1"}
    api_log, operator_log = (work / "api.log").open("w"), (work / "operator.log").open("w")
    api = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "kube-api", "--crds", str(ROOT / "crds"), "--kubeconfig", str(kubeconfig)],
                           stdout=subprocess.PIPE, stderr=api_log, text=True, env=env)
    url = re.search(r"at (http://\S+)", api.stdout.readline()).group(1)
    stand_ins = {f"smol-replicas-{i}": StubReplica(f"127.0.0.{50 + i}", keep_alive=True) for i in range(args.replicas + 1)}
    operator = watch = None
    try:
        cluster = Cluster(url)
        watch = AdapterWatch(url)
        operator_command = [sys.executable, "-P", "-m", "lorafleet", "operator", "-n", "default", "--liveness", "http://127.0.0.1:0/healthz"]
        operator = subprocess.Popen(operator_command, stdout=operator_log, stderr=subprocess.STDOUT, env=env)
        cluster.http.post(f"{GROUP}/basemodels", json={"apiVersion": "lorafleet.io/v1alpha1", "kind": "BaseModel", "metadata": {"name": "smol"},
                                                       "spec": {"model": {"id": "m", "source": "local"}, "replicas": args.replicas}}).raise_for_status()
        first = sorted(stand_ins)[: args.replicas]
        for pod in first:
            cluster.run_pod(pod, stand_ins[pod])
        wait(lambda: cluster.http.get("/apis/apps/v1/namespaces/default/deployments/smol-replicas").status_code == 200, 60)
        time.sleep(2)  # the operator is up and watching

        names = [f"adapter-{i:04d}" for i in range(args.adapters)]
        before, by_kind = cluster.revision(), cluster.writes()
        start = time.monotonic()

        def apply(name: str) -> None:
            cluster.http.post(f"{GROUP}/adapters", json={"apiVersion": "lorafleet.io/v1alpha1", "kind": "Adapter", "metadata": {"name": name},
                                                        "spec": {"baseModel": "smol", "id": f"org/{name}", "source": "local"}}).raise_for_status()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(apply, names))
        applied = time.monotonic() - start
        ready_s = wait(lambda: sum(s.get("phase") == "Ready" for s in list(watch.status.values())) == len(names), 600, 0.2)
        time.sleep(3)  # let the last status writes land
        writes_to_ready = cluster.revision() - before
        print(f"applied {len(names)} Adapters in {applied:.1f}s; all Ready after {ready_s if ready_s is None else round(ready_s, 1)}s "
              f"(goal < 60 s); {writes_to_ready} API writes ({writes_to_ready / len(names):.2f} per adapter): {breakdown(cluster.writes() - by_kind)}", flush=True)

        cpu_before, api_cpu_before = cpu_seconds(operator.pid), cpu_seconds(api.pid)
        rest_before = cluster.revision()
        time.sleep(args.rest_s / 2)
        cpu_half = cpu_seconds(operator.pid)
        time.sleep(args.rest_s / 2)
        rest_writes = cluster.revision() - rest_before
        print(f"at rest for {args.rest_s:.0f}s: {rest_writes} writes ({rest_writes * 60 / args.rest_s:.1f}/min, goal 0); "
              f"operator CPU {cpu_half - cpu_before:.2f}s in the first half (kopf still digesting the burst's watch events), "
              f"{cpu_seconds(operator.pid) - cpu_half:.2f}s in the second; API CPU {cpu_seconds(api.pid) - api_cpu_before:.2f}s", flush=True)

        new = sorted(stand_ins)[args.replicas]
        everyone = sorted(stand_ins)
        moved = [n for n in names if ring.owners(f"org/{n}", everyone, 1) == [new]]
        cluster.http.patch(f"{GROUP}/basemodels/smol", headers={"Content-Type": "application/merge-patch+json"},
                           json={"spec": {"replicas": args.replicas + 1}}).raise_for_status()
        wait(lambda: cluster.http.get("/apis/apps/v1/namespaces/default/deployments/smol-replicas").json()["spec"]["replicas"] == args.replicas + 1, 30, 0.1)
        scale_before, by_kind = cluster.revision(), cluster.writes()
        cluster.run_pod(new, stand_ins[new])
        ready_at = time.monotonic()

        def moved_ready() -> bool:
            by_name = watch.status
            return all(f"org/{n}" in stand_ins[new].loaded for n in moved) and \
                all(by_name[n].get("phase") == "Ready" and by_name[n].get("replicas") == [new] for n in moved)

        moved_s = wait(moved_ready, 120, 0.2)
        moved_s = None if moved_s is None else time.monotonic() - ready_at
        time.sleep(3)
        still_elsewhere = sum(f"org/{n}" in stand_ins[p].loaded for n in moved for p in first)
        answered = [at - ready_at for (op, _), at in list(stand_ins[new].answered.items()) if op == "load"]
        loads_s = f"{max(answered):.2f}" if answered else "-"
        print(f"scale {args.replicas} -> {args.replicas + 1}: {len(moved)} of {len(names)} adapters moved ({len(moved) / len(names):.1%}, "
              f"expect ~{1 / (args.replicas + 1):.0%}); Ready on the new pod {moved_s if moved_s is None else round(moved_s, 2)}s after it turned Ready "
              f"(goal < 10 s; its last load answered at {loads_s}s); {cluster.revision() - scale_before} writes ({breakdown(cluster.writes() - by_kind)}); {still_elsewhere} left loaded on old owners; "
              f"loads on the new pod {sum(op == 'load' for op, _ in stand_ins[new].calls)}", flush=True)
        print(f"operator: {cpu_seconds(operator.pid):.1f} CPU s in all, peak RSS {peak_rss_mb(operator.pid):.0f} MB (goal < 300 MB); "
              f"embedded API: {cpu_seconds(api.pid):.1f} CPU s, peak RSS {peak_rss_mb(api.pid):.0f} MB; "
              f"listings read {sum(r.listings for r in stand_ins.values())}", flush=True)

        # A restart (the Deployment's Recreate strategy: one active operator): what does it cost?
        operator.terminate()
        operator.wait(30)
        restart_before, by_kind = cluster.revision(), cluster.writes()
        calls_before = {p: (len(r.calls), r.listings) for p, r in stand_ins.items()}
        operator = subprocess.Popen(operator_command, stdout=operator_log, stderr=subprocess.STDOUT, env=env)
        time.sleep(args.restart_s)
        calls = sum(len(r.calls) - calls_before[p][0] for p, r in stand_ins.items())
        listings = sum(r.listings - calls_before[p][1] for p, r in stand_ins.items())
        print(f"operator restart, first {args.restart_s:.0f}s: {cluster.revision() - restart_before} writes ({breakdown(cluster.writes() - by_kind) or 'none'}), "
              f"{calls} loads or unloads, {listings} listings read; operator CPU {cpu_seconds(operator.pid):.1f}s, "
              f"peak RSS {peak_rss_mb(operator.pid):.0f} MB; logs in {work}", flush=True)
    finally:
        if watch is not None:
            watch.close()
        for process in (operator, api):
            if process is not None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
        for replica in stand_ins.values():
            replica.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
