"""An adapter update rolled out as a canary on `lorafleet up` with SmolLM2, under steady traffic, one run.

Starts the whole fleet on this machine (embedded API, operator, two replicas, gateway) with two random rank-8
SmolLM2 adapters, ``french`` and its retrained ``french-v2``, in the adapter folder. Closed-loop callers stream
requests for the Adapter's name through the gateway; time to first token is the first SSE event. After a steady
phase, one ``kubectl patch`` points the Adapter at ``french-v2`` with a two-step canary (20 %, then 50 %, then all);
the run records every answer until the name serves only the new version, then a steady phase after it.

It prints, side by side: TTFT p50/p99 in the steady phase before and during the rollout (goal: p99 during within
1.2x of steady), failed and cold answers (``x-adapter-tier`` not device/cpu; goal: 0 and 0), the share each version
served per step, and the time from the patch to 100 % of answers on the new version.

    .venv/bin/python -P bench/rollout.py [--callers 2] [--steady 30] [--pause 10]
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
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from support.kube import kubectl_for  # noqa: E402
from support.server import free_port  # noqa: E402

from lorafleet import model_store  # noqa: E402
from lorafleet.testing import make_lora_adapter  # noqa: E402


class Callers:
    """Closed-loop streaming callers; each answer: (started, TTFT s, status, tier, version)."""

    def __init__(self, url: str, name: str, callers: int) -> None:
        self.url, self.name, self.callers = url, name, callers
        self.answers: list[tuple[float, float, int, str, str]] = []
        self.running = True

    async def one(self, client: httpx.AsyncClient) -> None:
        body = {"inputs": "Translate to French: the weather is nice today.", "parameters": {"adapter_id": self.name, "max_new_tokens": 8}}
        while self.running:
            started = time.perf_counter()
            try:
                async with client.stream("POST", self.url + "/generate_stream", json=body) as response:
                    ttft = None
                    async for line in response.aiter_lines():
                        if line.startswith("data:") and ttft is None:
                            ttft = time.perf_counter() - started
                    failed = response.status_code != 200 or '"error"' in line
                    self.answers.append((started, ttft or float("nan"), 500 if failed else 200, response.headers.get("x-adapter-tier", ""),
                                         response.headers.get("x-adapter-id", "")))
            except httpx.HTTPError:
                self.answers.append((started, float("nan"), 599, "", ""))

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            await asyncio.gather(*(self.one(client) for _ in range(self.callers)))


def percentiles(values: list[float]) -> str:
    if not values:
        return "no answers"
    p50, p99 = np.percentile(values, [50, 99])
    return f"p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms  ({len(values)} answers)"


async def measure(url: str, kubectl, steady_s: float, pause_s: float, callers: int) -> None:
    traffic = Callers(url, "french", callers)
    task = asyncio.create_task(traffic.run())
    await asyncio.sleep(5)  # warm-up, not counted
    steady_from = time.perf_counter()
    await asyncio.sleep(steady_s)
    patched = time.perf_counter()
    rollout = {"steps": [{"weight": 20, "pause": f"{pause_s:g}s"}, {"weight": 50, "pause": f"{pause_s:g}s"}],
               "analysis": {"minRequests": 10, "interval": "1s"}}
    kubectl("patch", "adapter", "french", "--type", "merge", "-p", json.dumps({"spec": {"id": "french-v2", "rollout": rollout}}))
    everywhere = None
    while time.perf_counter() - patched < 10 * pause_s + 120:
        await asyncio.sleep(0.2)
        recent = [a for a in traffic.answers if a[0] > time.perf_counter() - 2.0]
        if len(recent) >= 5 and all(a[4] == "french-v2" for a in recent):
            everywhere = min(a[0] for a in recent if all(b[4] == "french-v2" for b in traffic.answers if b[0] >= a[0]))
            break
    done = time.perf_counter()
    await asyncio.sleep(steady_s / 2)
    traffic.running = False
    await task
    status = json.loads(kubectl("get", "adapter", "french", "-o", "json").stdout)["status"]

    answers = traffic.answers
    steady = [a for a in answers if steady_from <= a[0] < patched]
    during = [a for a in answers if patched <= a[0] < done]
    after = [a for a in answers if a[0] >= done]
    print(f"callers {callers}, steady phase {steady_s:g} s, canary steps 20 % and 50 % of {pause_s:g} s each")
    print(f"TTFT steady before:   {percentiles([a[1] for a in steady if a[2] == 200])}")
    print(f"TTFT during rollout:  {percentiles([a[1] for a in during if a[2] == 200])}")
    print(f"TTFT steady after:    {percentiles([a[1] for a in after if a[2] == 200])}")
    steady_p99 = np.percentile([a[1] for a in steady if a[2] == 200], 99)
    during_p99 = np.percentile([a[1] for a in during if a[2] == 200], 99)
    print(f"TTFT p99 during / steady: {during_p99 / steady_p99:.2f}x (goal <= 1.2x)")
    failed = [a for a in answers if a[2] != 200]
    cold = [a for a in answers if a[2] == 200 and a[3] not in ("device", "cpu")]
    print(f"failed answers: {len(failed)} of {len(answers)}; cold answers (tier not device/cpu): {len(cold)} (goal: 0 and 0)")
    share = sum(a[4] == "french-v2" for a in during) / max(1, len(during))
    print(f"answers by the new version during the rollout: {share:.0%}")
    took = f"{everywhere - patched:.1f} s" if everywhere is not None else "never (timed out)"
    print(f"kubectl patch -> 100 % of answers on the new version: {took} (the steps' pauses alone: {2 * pause_s:g} s)")
    print(f"status: phase {status.get('phase')}, rollout {status.get('rollout', {}).get('phase')}: {status.get('rollout', {}).get('message')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=2)
    parser.add_argument("--steady", type=float, default=30.0, help="seconds of steady traffic before the patch")
    parser.add_argument("--pause", type=float, default=10.0, help="seconds each canary step lasts")
    args = parser.parse_args()
    model = model_store.resolve_model("smollm2")
    with tempfile.TemporaryDirectory() as tmp:
        adapters, workdir, port = Path(tmp) / "adapters", Path(tmp) / "state", free_port()
        make_lora_adapter(model, adapters / "french", r=8, seed=1, scale=0.05)
        make_lora_adapter(model, adapters / "french-v2", r=8, seed=2, scale=0.05)
        (adapters / "french-v2").rename(Path(tmp) / "french-v2")  # not an Adapter of its own at startup
        up = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "up", "--adapters", str(adapters), "--replicas", "2", "--port", str(port), "--tenants", "none",
                               "--workdir", str(workdir), "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            for line in up.stdout:
                if "lorafleet is up" in line:
                    break
                if "not ready after" in line:
                    raise SystemExit(line)
            (Path(tmp) / "french-v2").rename(adapters / "french-v2")  # the retrained adapter arrives
            kubectl = kubectl_for(workdir / "kubeconfig", Path(tmp) / "kubecache")
            asyncio.run(measure(f"http://127.0.0.1:{port}", kubectl, args.steady, args.pause, args.callers))
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(120)


if __name__ == "__main__":
    main()
