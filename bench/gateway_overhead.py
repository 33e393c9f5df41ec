"""What the gateway adds: latency (p50, p99) and requests/s against a trivial upstream, side by side.

The upstream is a minimal ASGI app answering /generate at once; the gateway runs in its own
process in front of it; the client measures both paths in the same run, interleaved. A second
gateway traces every request (OTLP/HTTP to a sink that answers 200), so tracing's cost is measured
next to the untraced path. A third enforces a tenant policy (--tenants tenants with ten keys each; the
client calls with one of them), so tenancy's cost is measured next to the open path. A fourth serves with the h11
parser (--http-parser h11), to show what httptools buys.

    .venv/bin/python -P bench/gateway_overhead.py [--requests 2000] [--concurrency 16] [--no-traced] [--tenants 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

from lorafleet.bearer import key_hash
from lorafleet.net import free_port

UPSTREAM = '''
import json, sys, uvicorn
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    body = json.dumps({"generated_text": "ok"}).encode() if scope["path"] != "/health" else b""
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''


def wait(url: str) -> None:
    for _ in range(200):
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


async def measure(url: str, requests: int, concurrency: int, key: str | None = None) -> tuple[list[float], float]:
    body = json.dumps({"inputs": "Hello", "parameters": {"adapter_id": "org/adapter-7"}})
    latencies: list[float] = []
    async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer {key}"} if key else {}) as client:
        for _ in range(200):  # warm connections
            await client.post(url + "/generate", content=body, headers={"content-type": "application/json"})
        for _ in range(min(requests, 1000)):  # latency: one request at a time
            start = time.perf_counter()
            await client.post(url + "/generate", content=body, headers={"content-type": "application/json"})
            latencies.append(time.perf_counter() - start)
        queue = asyncio.Queue()
        for _ in range(requests):
            queue.put_nowait(None)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                await client.post(url + "/generate", content=body, headers={"content-type": "application/json"})

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        throughput = requests / (time.perf_counter() - start)
    return latencies, throughput


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--no-traced", dest="traced", action="store_false", help="skip the traced gateway")
    parser.add_argument("--no-h11", dest="h11", action="store_false", help="skip the gateway served with the h11 parser")
    parser.add_argument("--tenants", type=int, default=1000, help="tenants in the tenancy gateway's policy, ten keys each (0: no such gateway)")
    args = parser.parse_args()
    upstream_port, gateway_port, traced_port, sink_port, tenant_port, h11_port = free_port(), free_port(), free_port(), free_port(), free_port(), free_port()
    policy_file = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
    json.dump({"shared": ["org/adapter-7"], "tenants": [{"name": f"t{t}", "keyHashes": [key_hash(f"key-{t}-{k}") for k in range(10)],
                                                          "adapters": [f"t{t}-adapter"], "base": True, "limits": {"concurrentRequests": 10_000}}
                                                         for t in range(args.tenants)]}, policy_file)
    policy_file.close()
    upstream = subprocess.Popen([sys.executable, "-P", "-c", UPSTREAM, str(upstream_port)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    gateway_command = [sys.executable, "-P", "-m", "lorafleet", "gateway", "--replica", f"http://127.0.0.1:{upstream_port}", "--port"]
    gateway = subprocess.Popen([*gateway_command, str(gateway_port)], env=env)
    processes = [gateway, upstream]
    if args.tenants:  # its access log (a line a request) to /dev/null, as a log shipper would take it off the terminal
        processes.append(subprocess.Popen([*gateway_command, str(tenant_port), "--tenants-file", policy_file.name], env=env, stderr=subprocess.DEVNULL))
    if args.h11:
        processes.append(subprocess.Popen([*gateway_command, str(h11_port), "--http-parser", "h11"], env=env))
    if args.traced:
        processes.append(subprocess.Popen([sys.executable, "-P", "-c", UPSTREAM, str(sink_port)]))
        processes.append(subprocess.Popen([*gateway_command, str(traced_port), "--otlp-endpoint", f"http://127.0.0.1:{sink_port}"], env=env))
    try:
        direct_url, gateway_url = f"http://127.0.0.1:{upstream_port}", f"http://127.0.0.1:{gateway_port}"
        traced_url, tenant_url, h11_url = f"http://127.0.0.1:{traced_port}", f"http://127.0.0.1:{tenant_port}", f"http://127.0.0.1:{h11_port}"
        for url in (direct_url, gateway_url, *([traced_url] if args.traced else []), *([tenant_url] if args.tenants else []), *([h11_url] if args.h11 else [])):
            wait(url + "/health")
        results = {}
        paths = [("direct", direct_url), ("gateway", gateway_url), *([("gateway traced", traced_url)] if args.traced else []),
                 *([("gateway tenants", tenant_url)] if args.tenants else []), *([("gateway h11", h11_url)] if args.h11 else []),
                 ("direct again", direct_url)]
        for label, url in paths:
            key = f"key-{args.tenants // 2}-7" if label == "gateway tenants" else None
            latencies, throughput = asyncio.run(measure(url, args.requests, args.concurrency, key))
            q = statistics.quantiles(latencies, n=100)
            results[label] = (q[49], q[98], throughput)
            print(f"{label:<15} p50 {q[49] * 1e3:6.3f} ms   p99 {q[98] * 1e3:6.3f} ms   {throughput:7.0f} requests/s (concurrency {args.concurrency})", flush=True)
        direct_p50 = min(results["direct"][0], results["direct again"][0])
        direct_p99 = min(results["direct"][1], results["direct again"][1])
        print(f"added by the gateway: p50 {(results['gateway'][0] - direct_p50) * 1e3:.3f} ms, p99 {(results['gateway'][1] - direct_p99) * 1e3:.3f} ms; "
              f"throughput {results['gateway'][2] / max(results['direct'][2], results['direct again'][2]):.2f}x of direct")
        if args.traced:
            print(f"added by tracing: p50 {(results['gateway traced'][0] - results['gateway'][0]) * 1e3:.3f} ms, "
                  f"p99 {(results['gateway traced'][1] - results['gateway'][1]) * 1e3:.3f} ms; "
                  f"throughput {results['gateway traced'][2] / results['gateway'][2]:.2f}x of untraced")
        if args.h11:
            print(f"the h11 parser instead of httptools: p50 {(results['gateway h11'][0] - results['gateway'][0]) * 1e3:+.3f} ms; "
                  f"throughput {results['gateway h11'][2] / results['gateway'][2]:.2f}x")
        if args.tenants:
            print(f"added by tenancy ({args.tenants} tenants, {10 * args.tenants} keys): p50 {(results['gateway tenants'][0] - results['gateway'][0]) * 1e3:.3f} ms, "
                  f"p99 {(results['gateway tenants'][1] - results['gateway'][1]) * 1e3:.3f} ms; "
                  f"throughput {results['gateway tenants'][2] / results['gateway'][2]:.2f}x of the open gateway")
    finally:
        os.unlink(policy_file.name)
        for process in processes:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    main()
