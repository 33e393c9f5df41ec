"""The fleet under traffic, real processes, one run: routing policies compared, and a replica joining mid-trace.

Three `lorafleet serve` replicas of SmolLM2 on loopback addresses and a `lorafleet gateway`; 200
random rank-8 adapters under a local root; 8 device slots per replica. One open-loop seeded trace
(Poisson arrivals, Zipf(1.0) adapter popularity, short outputs) is replayed through the gateway
once per routing policy, each on freshly started replicas (cold caches). Per policy it prints
completed requests/s, time to first token p50/p95/p99 for requests whose adapter was on the
device when they arrived and for those that loaded it (the replica's ``x-adapter-tier`` header),
the cold loads, the device hit rate, and beside it what bench/routing_sim.py predicts for the same
stream (same adapters, same ring, 8 slots, each request in flight as long as it was here).

Then the same trace with a fourth replica joining at half time, with the gateway's hand-off and
without (``--no-handoff``): cold loads and TTFT p99 in the minute after the join, beside a steady
minute before it.

Goals (issue 17): lorafleet routing at most 1/3 of round robin's cold loads and at most half its
TTFT p99; the measured hit rate within 0.05 of the simulation's; with the hand-off, the minute after
a join has no more cold loads than a steady minute.

    .venv/bin/python -P bench/fleet.py [--requests 300] [--rate 2.0] [--skip-join]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import routing_sim  # noqa: E402
from support.server import adapter_events, wait_healthy  # noqa: E402

from lorafleet import model_store, ring  # noqa: E402
from lorafleet.gateway.config import GatewayConfig  # noqa: E402
from lorafleet.testing import make_lora_adapter  # noqa: E402

ADDRESSES = ["127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"]


@dataclass
class Result:
    start: float
    ttft: float | None
    end: float
    status: int
    tier: str
    replica: str
    adapter: str = ""
    error: str = ""  # a failed request's status line or exception, and the start of its body


def make_adapters(model: Path, root: Path, count: int, rank: int = 8, targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")) -> list[str]:
    """``count`` random adapters: one through peft, the rest with the same layout and new random weights."""
    template = make_lora_adapter(model, root / "a000", r=rank, seed=0, target_modules=list(targets))
    tensors = load_file(template / "adapter_model.safetensors")
    generator = torch.Generator().manual_seed(1)
    for i in range(1, count):
        folder = root / name_of(i)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(template / "adapter_config.json", folder / "adapter_config.json")
        save_file({k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
    return [name_of(i) for i in range(count)]


def name_of(i: int) -> str:
    return f"a{i:03d}"


def trace(count: int, adapters: int, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(arrival times in seconds, adapter index) of an open-loop Poisson stream with Zipf(1.0) popularity."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, adapters + 1)
    popular = rng.permutation(adapters)  # which adapter is the most popular is random
    chosen = popular[rng.choice(adapters, size=count, p=weights / weights.sum())]
    return np.cumsum(rng.exponential(1.0 / rate, size=count)), chosen


def warm_env() -> dict[str, str]:
    """The gateway's hand-offs need the replicas' warm token: both get the same one."""
    return {**os.environ, "LORAFLEET_WARM_TOKEN": "bench-warm"}


def port_on(address: str) -> int:
    with socket.socket() as sock:
        sock.bind((address, 0))
        return sock.getsockname()[1]


def start_replica(address: str, port: int, model: Path, root: Path, work: Path, args: argparse.Namespace) -> subprocess.Popen:
    cpu_memory = ["--adapter-cpu-memory", args.cpu_memory] if args.cpu_memory else []
    return subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "serve", "--model", str(model), "--host", address, "--port", str(port),
                             "--adapter-root", str(root), "--adapter-source", "local", "--adapter-cache-dir", str(work / f"cache-{address}-{port}"),
                             "--max-active-adapters", str(args.slots), "--max-lora-rank", str(args.rank), "--grace-period-s", "5", *cpu_memory],
                            stdout=(work / f"replica-{address}.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env=warm_env())


def cold_loads(url: str) -> int:
    """Adapter loads the replica read from disk or from the source (its own counters), not counting copies from CPU memory."""
    events = adapter_events(url)
    return int(events.get("source_fetch", 0) + events.get("disk_hit", 0) + events.get("local_read", 0))


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


async def replay(gateway: str, times: np.ndarray, chosen: np.ndarray, names: list[str], new_tokens: int) -> list[Result]:
    results: list[Result] = []
    origin = time.monotonic()

    async def one(client: httpx.AsyncClient, at: float, adapter: str) -> None:
        await asyncio.sleep(max(0.0, origin + at - time.monotonic()))
        start = time.monotonic()
        body = {"inputs": "Write one short sentence about the sea.", "parameters": {"adapter_id": adapter, "max_new_tokens": new_tokens,
                                                                                     "ignore_eos_token": True}}
        ttft, status, tier, replica, error = None, 0, "", "", ""
        try:
            async with client.stream("POST", gateway + "/generate_stream", json=body) as response:
                status, tier, replica = response.status_code, response.headers.get("x-adapter-tier", ""), response.headers.get("x-lorafleet-replica", "")
                async for line in response.aiter_lines():
                    if line.startswith("data:") and ttft is None:
                        ttft = time.monotonic() - start
                    if status != 200 or '"error"' in line:
                        error = error or f"{status} {line[:160]}"
        except httpx.HTTPError as exc:
            status, error = -1, f"{type(exc).__name__}: {exc}"[:200]
        results.append(Result(start - origin, ttft, time.monotonic() - origin, status, tier, replica, adapter, error))

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=None)) as client:
        await asyncio.gather(*(one(client, float(t), names[i]) for t, i in zip(times, chosen)))
    return sorted(results, key=lambda r: r.start)


def pct(values: list[float], q: float) -> str:
    return f"{np.percentile(values, q):.2f}" if values else "-"


def summary(results: list[Result]) -> dict:
    """Tiers as the replica saw the adapter on arrival: device (hot), cpu (in memory: a copy to the device), loading (cold: disk or source)."""
    ok = [r for r in results if r.status == 200 and r.ttft is not None]
    span = max(r.end for r in results) - min(r.start for r in results)
    return {"completed/s": len(ok) / span, "failed": len(results) - len(ok), "hit rate": sum(r.tier == "device" for r in ok) / max(1, len(ok)),
            "cold requests": sum(r.tier == "loading" for r in ok), "ttft all": [r.ttft for r in ok],
            "ttft device": [r.ttft for r in ok if r.tier == "device"], "ttft cpu": [r.ttft for r in ok if r.tier == "cpu"],
            "ttft cold": [r.ttft for r in ok if r.tier == "loading"]}


def predicted_hit_rate(policy: str, results: list[Result], chosen: np.ndarray, names: list[str], members: list[str], rate: float, slots: int) -> float:
    """routing_sim's hit rate for this stream: same adapters, same ring, each request in flight as long as it was here."""
    routing_sim.SLOTS = slots
    index = {m: i for i, m in enumerate(members)}
    used = sorted(set(chosen.tolist()))
    owner_lists = [[] for _ in range(max(used) + 1)]
    for a in used:
        owner_lists[a] = [index[m] for m in ring.owners(names[a], members)]
    durations = np.array([(r.end - r.start) * rate for r in results])
    hit, _, _ = routing_sim.simulate(policy, len(members), chosen, durations, owner_lists, floor=GatewayConfig().min_bound)
    return hit


def run_fleet(policy: str, handoff: bool, join_at: float | None, args: argparse.Namespace, model: Path, root: Path, work: Path,
              times: np.ndarray, chosen: np.ndarray, names: list[str]) -> tuple[list[Result], list[str], int]:
    """The trace through a fresh fleet: (results, the gateway's members, adapter loads from disk or source on all replicas)."""
    count = 3
    ports = [port_on(a) for a in ADDRESSES]
    urls = [f"http://{a}:{p}" for a, p in zip(ADDRESSES, ports)]
    replicas = [start_replica(ADDRESSES[i], ports[i], model, root, work, args) for i in range(count)]
    gateway_port = port_on("127.0.0.1")
    members = urls[: count + (1 if join_at is not None else 0)]
    gateway = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", "gateway", "--port", str(gateway_port), "--policy", policy,
                                *([] if handoff else ["--no-handoff"]), *[x for u in members for x in ("--replica", u)]],
                               stdout=(work / f"gateway-{policy}.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True, env=warm_env())
    processes = [*replicas, gateway]
    try:
        for url in urls[:count]:
            wait_healthy(url, timeout=180)
        wait_healthy(f"http://127.0.0.1:{gateway_port}")

        async def with_join() -> list[Result]:
            task = asyncio.create_task(replay(f"http://127.0.0.1:{gateway_port}", times, chosen, names, args.new_tokens))
            if join_at is not None:
                await asyncio.sleep(max(0.0, join_at - args.join_lead_s))  # it takes about this long to load the model
                processes.append(start_replica(ADDRESSES[count], ports[count], model, root, work, args))
            return await task

        results = asyncio.run(with_join())
        loads = sum(cold_loads(url) for url, process in zip(urls, replicas + processes[count + 1:]) if process.poll() is None)
        return results, [u.split("//")[1] for u in members], loads
    finally:
        stop(processes)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=200)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--rate", type=float, default=2.0, help="arrivals per second (open loop)")
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj", help="the adapters' target modules")
    parser.add_argument("--cpu-memory", default=None, help="each replica's CPU tier (--adapter-cpu-memory), e.g. 450MiB for a third of "
                        "1,500 rank-4 q/v adapters (the long-tail case)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--policies", default="lorafleet,round-robin,least-loaded")
    parser.add_argument("--skip-join", action="store_true")
    parser.add_argument("--window-s", type=float, default=60.0, help="the minute after the join, and the steady one before it")
    parser.add_argument("--join-lead-s", type=float, default=12.0, help="start the fourth replica this long before it should join")
    args = parser.parse_args()
    model = model_store.fetch("smollm2", log=lambda m: None)
    work = Path(tempfile.mkdtemp(prefix="lorafleet-fleet-"))
    root = work / "adapters"
    names = make_adapters(model, root, args.adapters, args.rank, tuple(args.targets.split(",")))
    times, chosen = trace(args.requests, args.adapters, args.rate, args.seed)
    print(f"trace: {args.requests} requests at {args.rate}/s over {times[-1]:.0f}s, {len(set(chosen.tolist()))} distinct of {args.adapters} adapters "
          f"(Zipf 1.0), {args.new_tokens} new tokens each; 3 replicas x {args.slots} device slots; work in {work}", flush=True)
    print("TTFT in seconds, split by where the replica found the adapter: device (hot), cpu (a copy to the device), cold (read from disk or "
          "its source); 'loads' counts the replicas' reads from disk or source, 'waited' the requests that waited on one, 'hit rate' the device hits",
          flush=True)
    print(f"{'policy':<14} {'done/s':>7} {'failed':>6} {'loads':>5} {'waited':>6} {'hit rate':>8} {'sim hit':>8} {'TTFT p50/p95/p99 all':>22} "
          f"{'device p50/p99':>15} {'cpu p50/p99':>12} {'cold p50/p99':>13}", flush=True)
    measured = {}
    for policy in args.policies.split(","):
        results, members, loads = run_fleet(policy, True, None, args, model, root, work, times, chosen, names)
        s = summary(results)
        s["cold loads"] = loads
        sim = predicted_hit_rate(policy, results, chosen, names, members, args.rate, args.slots)
        measured[policy] = s
        print(f"{policy:<14} {s['completed/s']:>7.2f} {s['failed']:>6} {s['cold loads']:>5} {s['cold requests']:>6} {s['hit rate']:>8.3f} {sim:>8.3f} "
              f"{pct(s['ttft all'], 50):>6}/{pct(s['ttft all'], 95)}/{pct(s['ttft all'], 99):<6} "
              f"{pct(s['ttft device'], 50):>8}/{pct(s['ttft device'], 99):<6} {pct(s['ttft cpu'], 50):>5}/{pct(s['ttft cpu'], 99):<6} "
              f"{pct(s['ttft cold'], 50):>6}/{pct(s['ttft cold'], 99):<6}", flush=True)
    if "lorafleet" in measured and "round-robin" in measured:
        lf, rr = measured["lorafleet"], measured["round-robin"]
        print(f"lorafleet / round robin: cold loads {lf['cold loads'] / max(1, rr['cold loads']):.2f} (goal <= 0.33), "
              f"TTFT p99 {np.percentile(lf['ttft all'], 99) / np.percentile(rr['ttft all'], 99):.2f} (goal <= 0.5)", flush=True)
    if args.skip_join:
        return 0
    window = args.window_s
    times, chosen = trace(int(args.rate * 4 * window), args.adapters, args.rate, args.seed)  # long enough for a steady minute before the join
    join_at = 2.5 * window
    print(f"join trace: {len(times)} requests over {times[-1]:.0f}s; a fourth replica joins at about {join_at:.0f}s", flush=True)
    for handoff in (True, False):
        results, _, _ = run_fleet("lorafleet", handoff, join_at, args, model, root, work, times, chosen, names)
        joined = [r for r in results if r.replica.startswith(ADDRESSES[3])]
        first_there = min((r.start for r in joined), default=join_at)
        after = [r for r in results if first_there <= r.start < first_there + window and r.status == 200]
        before = [r for r in results if first_there - window - 10 <= r.start < first_there - 10 and r.status == 200]
        cold_after, cold_before = sum(r.tier == "loading" for r in after), sum(r.tier == "loading" for r in before)
        p99 = lambda rs: pct([r.ttft for r in rs if r.ttft is not None], 99)  # noqa: E731
        print(f"join at {first_there:.0f}s, {'with' if handoff else 'without'} hand-off: minute after: {len(after)} requests, {cold_after} waited on a "
              f"load, TTFT p99 {p99(after)}s; steady minute before: {len(before)} requests, {cold_before} waited, TTFT p99 {p99(before)}s; "
              f"served by the new replica: {len(joined)}", flush=True)
    print(json.dumps({"work": str(work)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
