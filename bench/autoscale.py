"""The fleet following demand on real processes: `lorafleet up` with SmolLM2, autoscaling from zero and back, one run.

The whole fleet on this machine (embedded API, operator, node agent, replica processes, gateway). The BaseModel gets
``spec.autoscaling`` (minReplicas 0, maxReplicas 3, targetRequestsPerReplica 2, interval 2 s, scaleDownDelay 30 s,
idleToZero 30 s); the run waits for zero, sends one request to the fleet at zero (its latency against the replica
start time, bench/startup.py: goal within start + 2 s), then closed-loop callers ramp 2 -> 6 -> 2 -> 0 and the
replica count is read every second. It prints the trace (replicas asked for, replicas ready, callers), the time from
each load change to the fleet's answer, failed requests (goal 0), changes per stabilization window under each steady
phase (goal at most 1) and the time back to zero.

    .venv/bin/python -P bench/autoscale.py [--phase 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from support.kube import kubectl_for  # noqa: E402
from support.server import free_port  # noqa: E402

AUTOSCALING = {"enabled": True, "minReplicas": 0, "maxReplicas": 3, "targetRequestsPerReplica": 2, "interval": "2s",
               "scaleDownDelay": "30s", "idleToZero": "30s", "coldStartTimeout": "60s"}
BODY = {"inputs": "Write a long story about a lighthouse keeper.", "parameters": {"max_new_tokens": 48}}


class Load:
    def __init__(self, url: str) -> None:
        self.url, self.callers, self.answers, self.failures = url, 0, 0, []

    async def caller(self, client: httpx.AsyncClient, index: int) -> None:
        while True:
            if index >= self.callers:
                await asyncio.sleep(0.2)
                continue
            try:
                response = await client.post(self.url + "/generate", json=BODY)
                if response.status_code == 200:
                    self.answers += 1
                else:
                    self.failures.append(f"{response.status_code} {response.text[:100]}")
            except httpx.HTTPError as exc:
                self.failures.append(type(exc).__name__)


def fleet(kubectl) -> tuple[int, int]:
    base = json.loads(kubectl("get", "basemodel", "smollm2", "-o", "json").stdout)
    return base["spec"]["replicas"], (base.get("status") or {}).get("readyReplicas", 0)


async def run(url: str, kubectl, phase_s: float) -> None:
    kubectl("patch", "basemodel", "smollm2", "--type", "merge", "-p", json.dumps({"spec": {"autoscaling": AUTOSCALING}}))
    started = time.monotonic()
    while fleet(kubectl)[0] != 0:
        await asyncio.sleep(1)
    print(f"idle to zero: {time.monotonic() - started:.1f} s after autoscaling was turned on (idleToZero 30 s)", flush=True)
    await asyncio.sleep(3)  # the last replica process gone
    async with httpx.AsyncClient(timeout=120) as client:
        first = time.monotonic()
        response = await client.post(url + "/generate", json={**BODY, "parameters": {"max_new_tokens": 4}})
        print(f"first request at zero: {response.status_code} in {time.monotonic() - first:.1f} s", flush=True)
        load = Load(url)
        tasks = [asyncio.create_task(load.caller(client, i)) for i in range(8)]
        trace, t0 = [], time.monotonic()
        for callers in (2, 6, 2, 0):
            load.callers = callers
            end = time.monotonic() + (phase_s if callers else 75)
            while time.monotonic() < end:
                asked, ready = fleet(kubectl)
                trace.append((time.monotonic() - t0, callers, asked, ready))
                if callers == 0 and asked == 0:
                    break
                await asyncio.sleep(1)
        for task in tasks:
            task.cancel()
    print(f"{'t (s)':>6} {'callers':>8} {'asked':>6} {'ready':>6}")
    last = None
    for t, callers, asked, ready in trace:
        if (callers, asked, ready) != last:
            print(f"{t:6.0f} {callers:8d} {asked:6d} {ready:6d}")
            last = (callers, asked, ready)
    for phase in (2, 6):
        asked = [a for _, c, a, _ in trace if c == phase]
        changes = sum(1 for x, y in zip(asked, asked[1:]) if x != y)
        print(f"{phase} callers: replicas asked {sorted(set(asked))}, {changes} changes over {len(asked)} s")
    zero_at = next((t for t, c, a, _ in trace if c == 0 and a == 0), None)
    stop_at = next((t for t, c, _, _ in trace if c == 0), None)
    print(f"answers {load.answers}, failed {len(load.failures)} {load.failures[:5]}; back to zero "
          f"{'%.0f s after the load stopped' % (zero_at - stop_at) if zero_at is not None and stop_at is not None else 'not within 75 s'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", type=float, default=60.0, help="seconds of each load phase")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir, port = Path(tmp) / "state", free_port()
        up = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "up", "--adapters", str(Path(tmp) / "none"), "--replicas", "1",
                               "--port", str(port), "--tenants", "none", "--workdir", str(workdir), "--timeout", "300"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in up.stdout:
                if "lorafleet is up" in line:
                    break
                if "not ready after" in line:
                    raise SystemExit(line)
            kubectl = kubectl_for(workdir / "kubeconfig", Path(tmp) / "kubecache")
            asyncio.run(run(f"http://127.0.0.1:{port}", kubectl, args.phase))
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(120)


if __name__ == "__main__":
    main()
