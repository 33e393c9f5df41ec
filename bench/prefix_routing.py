"""Does routing by prompt prefix (the gateway's --prefix-chars) pay? Real processes, one run, side by side.

Three `lorafleet serve` replicas of SmolLM2 with a small KV cache (``--kv-cache-memory``, 48 MiB: about
1,000 tokens, room for four of the tenants' system prompts) and a `lorafleet gateway`. Twelve tenants
each have their own ~250-token system prompt; every request is a tenant's prompt plus a short question, base
model, 1 new token (so the latency is the time to first token), ``--concurrency`` clients in a closed loop,
tenants in a seeded random order. Once with the gateway routing by adapter only (base requests go to the
least loaded replica, so every replica sees every tenant) and once with ``--prefix-chars 256`` (each
tenant's requests meet on one replica), each on freshly started replicas. Printed: latency p50/p90,
requests/s, and the share of prompt tokens the replicas found in their prefix caches.

    .venv/bin/python -P bench/prefix_routing.py [--requests 96] [--concurrency 3] [--kv-cache-memory 48M]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))
from fleet import port_on, stop  # noqa: E402
from support.metrics import metric  # noqa: E402
from support.server import wait_healthy  # noqa: E402

from lorafleet import model_store  # noqa: E402

ADDRESSES = ["127.0.0.31", "127.0.0.32", "127.0.0.33"]
PRODUCTS = ["bicycles", "kettles", "tents", "pianos", "printers", "kayaks", "lamps", "drones", "sofas", "watches", "ovens", "guitars"]


def tenant_prompt(i: int) -> str:
    product = PRODUCTS[i]
    return (f"You are the support assistant of a shop that sells {product}. " * 4 + f"Answer questions about {product}, their prices, "
            f"delivery, returns and repairs in one short sentence. Never discuss anything but {product}. " * 3)


def start_fleet(work: Path, model: Path, kv_memory: str, prefix_chars: int) -> tuple[list[subprocess.Popen], str, list[str]]:
    processes, urls = [], []
    for address in ADDRESSES:
        port = port_on(address)
        processes.append(subprocess.Popen(
            [sys.executable, "-P", "-m", "lorafleet", "serve", "--model", str(model), "--host", address, "--port", str(port), "--dtype", "float32",
             "--kv-cache-memory", kv_memory, "--adapter-cache-dir", str(work / f"cache-{address}"), "--grace-period-s", "1"],
            stdout=(work / f"replica-{address}.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True))
        urls.append(f"http://{address}:{port}")
    gateway_port = port_on("127.0.0.1")
    processes.append(subprocess.Popen(
        [sys.executable, "-P", "-m", "lorafleet", "gateway", "--port", str(gateway_port), "--prefix-chars", str(prefix_chars),
         *[arg for url in urls for arg in ("--replica", url)]],
        stdout=(work / "gateway.log").open("ab"), stderr=subprocess.STDOUT, start_new_session=True))
    for url in urls:
        wait_healthy(url, timeout=300)
    wait_healthy(f"http://127.0.0.1:{gateway_port}", timeout=60)
    return processes, f"http://127.0.0.1:{gateway_port}", urls


async def replay(gateway: str, order: list[tuple[int, str]], concurrency: int) -> list[float]:
    queue = list(order)
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient) -> None:
        while queue:
            tenant, question = queue.pop(0)
            start = time.perf_counter()
            response = await http.post(gateway + "/generate", json={"inputs": tenant_prompt(tenant) + question, "parameters": {"max_new_tokens": 1}})
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)

    async with httpx.AsyncClient(timeout=300) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--concurrency", type=int, default=3)
    parser.add_argument("--kv-cache-memory", default="48M")
    parser.add_argument("--prefix-chars", type=int, default=256)
    args = parser.parse_args()
    model = model_store.model_path("smollm2")
    rng = random.Random(0)
    questions = ["Price?", "Do you deliver to Spain?", "Can I return it after a month?", "Is there a warranty?", "Colours?", "Repairs?"]
    order = [(rng.randrange(len(PRODUCTS)), rng.choice(questions)) for _ in range(args.requests)]
    for label, chars in (("by adapter only", 0), (f"--prefix-chars {args.prefix_chars}", args.prefix_chars)):
        with tempfile.TemporaryDirectory() as tmp:
            processes, gateway, urls = start_fleet(Path(tmp), model, args.kv_cache_memory, chars)
            try:
                start = time.perf_counter()
                latencies = asyncio.run(replay(gateway, order, args.concurrency))
                elapsed = time.perf_counter() - start
                queried = sum(metric(url, "vllm:prefix_cache_queries_total") for url in urls)
                hit = sum(metric(url, "vllm:prefix_cache_hits_total") for url in urls)
                served = [metric(url, 'lorafleet_requests_total{adapter="",route="/generate",status="200"}') for url in urls]
            finally:
                stop(processes)
        q = statistics.quantiles(latencies, n=10)
        print(f"{label:<22} TTFT p50 {statistics.median(latencies) * 1e3:7.0f} ms  p90 {q[8] * 1e3:7.0f} ms  {len(latencies) / elapsed:5.2f} requests/s  "
              f"prompt tokens from cache {hit / max(queried, 1):4.0%}  requests per replica {[int(s) for s in served]}", flush=True)


if __name__ == "__main__":
    main()
