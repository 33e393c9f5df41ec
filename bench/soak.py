"""Soak: replicas and a gateway as real processes under mixed, partly hostile traffic, with one replica
SIGKILLed and another SIGSTOPped mid-run. Not a test: CI never runs it.

Traffic (client workers in one asyncio loop, through the gateway): non-streaming requests for more
adapters than any replica has slots (12 adapters, 4 slots each), base-model and OpenAI chat
requests, streams abandoned after their first token, streams read to the end, junk adapter ids
(a hub with nothing listening, local ids that do not exist) and poison values (NaN temperature).
At a third of the run replica 0 is SIGKILLed and restarted 15 s later (as a kubelet would); at half
replica 1 is SIGSTOPped for 20 s. Every minute it prints, per kind, requests answered and lost (a
valid non-streaming request that did not get its 200: must be 0), p99 latency of the answered, and
RSS and open descriptors of every process (must stay flat).

    .venv/bin/python -P bench/soak.py [--minutes 10] [--replicas 3] [--clients 24] [--model tiny|smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADAPTERS, SLOTS = 12, 4
# kind: (weight, what counts as answered)
KINDS = {
    "adapter": (45, {200}), "base": (10, {200}), "chat": (10, {200}), "stream-abandoned": (10, {200}),
    "stream-full": (5, {200}), "junk-hub": (5, {424, 404, 429}), "junk-local": (5, {404}), "poison": (10, {422}),
}
VALID_NON_STREAMING = {"adapter", "base", "chat"}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_stats(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open descriptors) of a live process, from /proc."""
    try:
        rss = next(int(line.split()[1]) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("VmRSS"))
        return rss / 1024, len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, StopIteration):
        return 0.0, 0


class Fleet:
    def __init__(self, model: Path, root: Path, workdir: Path, replicas: int) -> None:
        self.model, self.root, self.workdir = model, root, workdir
        self.ports = [free_port() for _ in range(replicas)]
        self.gateway_port = free_port()
        self.processes: dict[str, subprocess.Popen] = {}

    def _spawn(self, name: str, args: list[str]) -> None:
        env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{free_port()}", "HF_HUB_CACHE": str(self.workdir / "hf"),
               "LORAFLEET_ADMIN_TOKEN": "soak", "LORAFLEET_WARM_TOKEN": "soak-warm", "PYTHONUNBUFFERED": "1"}
        log = (self.workdir / f"{name}.log").open("ab")
        self.processes[name] = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet", *args], env=env, stdout=log, stderr=subprocess.STDOUT)

    def start_replica(self, i: int) -> None:
        self._spawn(f"replica-{i}", [
            "serve", "--model", str(self.model), "--model-source", "local", "--port", str(self.ports[i]), "--adapter-source", "local",
            "--adapter-root", str(self.root), "--adapter-cache-dir", str(self.workdir / f"cache-{i}"), "--max-active-adapters", str(SLOTS),
            "--max-total-tokens", "512", "--max-input-length", "256", "--kv-cache-memory", "256M", "--adapter-cycle-time-s", "1"])

    def start(self) -> None:
        for i in range(len(self.ports)):
            self.start_replica(i)
        self._spawn("gateway", ["gateway", "--port", str(self.gateway_port), *[a for p in self.ports for a in ("--replica", f"http://127.0.0.1:{p}")]])

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        urls = [f"http://127.0.0.1:{p}/health" for p in [*self.ports, self.gateway_port]]
        while time.monotonic() < deadline:
            try:
                if all(httpx.get(u, timeout=2).status_code == 200 for u in urls):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError("the fleet did not become ready")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGCONT)
                process.terminate()
        for process in self.processes.values():
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()


def request_for(kind: str, rng: random.Random) -> tuple[str, dict | bytes]:
    adapter = f"a{rng.randrange(ADAPTERS)}"
    tokens = rng.randint(8, 24)
    if kind == "adapter":
        return "/generate", {"inputs": "Tell me a story about", "parameters": {"adapter_id": adapter, "max_new_tokens": tokens}}
    if kind == "base":
        return "/generate", {"inputs": "Once upon a time", "parameters": {"max_new_tokens": tokens}}
    if kind == "chat":
        return "/v1/chat/completions", {"model": adapter, "max_tokens": tokens, "messages": [{"role": "user", "content": "Hello there"}]}
    if kind.startswith("stream"):
        return "/generate_stream", {"inputs": "Stream this", "parameters": {"adapter_id": adapter, "max_new_tokens": 32}}
    if kind == "junk-hub":
        return "/generate", {"inputs": "x", "parameters": {"adapter_id": f"junk/id{rng.randrange(10_000)}", "adapter_source": "hub"}}
    if kind == "junk-local":
        return "/generate", {"inputs": "x", "parameters": {"adapter_id": f"nope{rng.randrange(10_000)}"}}
    return "/generate", b'{"inputs": "x", "parameters": {"temperature": NaN, "do_sample": true}}'


async def client(url: str, end: float, rng: random.Random, results: list) -> None:
    names, weights = list(KINDS), [w for w, _ in KINDS.values()]
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < end:
            kind = rng.choices(names, weights)[0]
            path, body = request_for(kind, rng)
            kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
            started = time.monotonic()
            status = 0
            try:
                if kind.startswith("stream"):
                    async with http.stream("POST", path, **kwargs) as response:
                        status = response.status_code
                        async for line in response.aiter_lines():
                            if kind == "stream-abandoned" and line.startswith("data:"):
                                break  # hang up after the first token
                else:
                    status = (await http.post(path, **kwargs)).status_code
            except httpx.HTTPError:
                status = 0
            results.append((started, kind, status, time.monotonic() - started))


async def chaos(fleet: Fleet, start: float, seconds: float, say) -> None:  # noqa: ANN001
    await asyncio.sleep(max(0.0, start + seconds / 3 - time.monotonic()))
    victim = fleet.processes["replica-0"]
    victim.kill()
    say(f"t={time.monotonic() - start:5.0f}s SIGKILL replica-0 (restarted in 15 s)")
    await asyncio.sleep(15)
    fleet.start_replica(0)
    await asyncio.sleep(max(0.0, start + seconds / 2 - time.monotonic()))
    stopped = fleet.processes["replica-1"]
    stopped.send_signal(signal.SIGSTOP)
    say(f"t={time.monotonic() - start:5.0f}s SIGSTOP replica-1 for 20 s")
    await asyncio.sleep(20)
    stopped.send_signal(signal.SIGCONT)
    say(f"t={time.monotonic() - start:5.0f}s SIGCONT replica-1")


def report(results: list, minute: int, start: float, fleet: Fleet, with_processes: bool = True) -> None:
    rows = [r for r in results if minute * 60 <= r[0] - start < (minute + 1) * 60]
    by_kind: dict[str, list] = defaultdict(list)
    for _, kind, status, seconds in rows:
        by_kind[kind].append((status, seconds))
    answered = sum(status in KINDS[kind][1] for _, kind, status, _ in rows)
    lost = sum(status != 200 for _, kind, status, _ in rows if kind in VALID_NON_STREAMING)
    latencies = sorted(s for _, kind, status, s in rows if kind in VALID_NON_STREAMING and status == 200)
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    stats = " ".join(f"{name}={rss:.0f}M/{fds}fd" for name, process in fleet.processes.items()
                     for rss, fds in [process_stats(process.pid)]) if with_processes else ""
    odd = {k: sorted({s for s, _ in v if s not in KINDS[k][1]}) for k, v in by_kind.items()}
    odd = {k: v for k, v in odd.items() if v}
    print(f"min {minute + 1:2d}  requests {len(rows):5d}  answered {answered:5d}  lost {lost:3d}  p99 {p99:6.2f}s  {stats}"
          + (f"  unexpected {odd}" if odd else ""), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--model", default="tiny", help="tiny (a random tiny Llama, fast) or smollm2")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from lorafleet import model_store
    from lorafleet.testing import make_lora_adapter, make_tiny_model

    with tempfile.TemporaryDirectory(prefix="lorafleet-soak-") as tmp:
        workdir = Path(tmp)
        model = make_tiny_model(workdir / "model") if args.model == "tiny" else model_store.resolve_model(args.model)
        for i in range(ADAPTERS):
            make_lora_adapter(model, workdir / "adapters" / f"a{i}", r=8, seed=i)
        fleet = Fleet(model, workdir / "adapters", workdir, args.replicas)
        fleet.start()
        try:
            fleet.wait_ready()
            print(f"{args.replicas} replicas ({SLOTS} slots each, {ADAPTERS} adapters) + gateway, {args.clients} clients, "
                  f"{args.minutes:g} min; logs in {workdir}", flush=True)
            results: list = []
            seconds = args.minutes * 60
            start = time.monotonic()

            async def run() -> None:
                rng = random.Random(args.seed)
                url = f"http://127.0.0.1:{fleet.gateway_port}"
                workers = [client(url, start + seconds, random.Random(rng.random()), results) for _ in range(args.clients)]

                async def minutes() -> None:
                    for minute in range(int(args.minutes + 0.999)):
                        await asyncio.sleep(max(0.0, start + (minute + 1) * 60 - time.monotonic()))
                        report(results, minute, start, fleet)

                await asyncio.gather(*workers, chaos(fleet, start, seconds, print), minutes())

            asyncio.run(run())
            # The rows above were printed as each minute ended, before its slowest requests returned:
            # the table again with every request, then what the lost ones were.
            print("\nevery request, by the minute it started:")
            for minute in range(int(args.minutes + 0.999)):
                report(results, minute, start, fleet, with_processes=False)
            valid = [r for r in results if r[1] in VALID_NON_STREAMING]
            lost = [r for r in valid if r[2] != 200]
            print(f"total: {len(results)} requests, {len(valid)} valid non-streaming, lost {len(lost)}")
            for started, kind, status, took in lost[:20]:
                print(f"  lost: t={started - start:6.1f}s {kind} status {status or 'no answer'} after {took:.1f}s")
        finally:
            fleet.stop()


if __name__ == "__main__":
    main()
