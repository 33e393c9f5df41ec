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

Attackers (``--attackers N`` clients in a process of their own beside the normal ones, as in the third
adversarial run): poison merges (weights 1e30, density 1e-300), merges of many members abandoned after a second,
each spec new, schemas that compile for minutes (and, compiled, cost more with every token), warm floods and
catalogue reads straight at the replicas. Their answers are theirs; what counts is that no normal request is lost
and the normal clients' p99 (non-streaming latency, and time to first token of full streams) stays within 2x of a
run without attackers: ``--baseline`` runs that first and prints the ratios. ``--attacks`` picks the kinds; ``--each-attack`` runs one soak per kind after the baseline, to see
which one costs the normal clients most.

    .venv/bin/python -P bench/soak.py [--minutes 10] [--replicas 3] [--clients 24] [--attackers 8] [--baseline] [--each-attack]
        [--attacks poison-merge,warm-flood,...] [--model tiny|smollm2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from lorafleet.net import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ADAPTERS, SLOTS = 12, 4
# kind: (weight, what counts as answered)
KINDS = {
    "adapter": (45, {200}), "base": (10, {200}), "chat": (10, {200}), "stream-abandoned": (10, {200}),
    "stream-full": (5, {200}), "junk-hub": (5, {424, 404, 429}), "junk-local": (5, {404}), "poison": (10, {422}),
}
VALID_NON_STREAMING = {"adapter", "base", "chat"}
ATTACKS = ("poison-merge", "abandoned-merge", "slow-schema", "warm-flood", "catalogue-read")
def slow_schema(width: int) -> dict:
    """Each width a new schema; xgrammar compiles these for seconds (tiny vocabulary) to minutes (SmolLM2's)."""
    return {"type": "string", "pattern": "^((.{1," + str(width) + "}){1,20}){1,20}$"}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a live process and of its children it has waited for, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


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
            status, first = 0, None
            try:
                if kind.startswith("stream"):
                    async with http.stream("POST", path, **kwargs) as response:
                        status = response.status_code
                        async for line in response.aiter_lines():
                            if line.startswith("data:") and first is None:
                                first = time.monotonic() - started
                            if kind == "stream-abandoned" and line.startswith("data:"):
                                break  # hang up after the first token
                else:
                    status = (await http.post(path, **kwargs)).status_code
            except httpx.HTTPError:
                status = 0
            results.append((started, kind, status, time.monotonic() - started, first))


async def attacker(url: str, replicas: list[str], end: float, rng: random.Random, attacks: list, kinds: tuple[str, ...] = ATTACKS) -> None:
    """Hostile traffic of every kind the third adversarial run found; its answers are counted, never judged."""
    async with httpx.AsyncClient(timeout=30) as http:
        while time.monotonic() < end:
            kind = rng.choice(kinds)
            status = 0
            try:
                if kind == "poison-merge":
                    merged = rng.choice([{"ids": ["a0"], "weights": [1e30]}, {"ids": ["a0", "a1"], "weights": [1e300, 1]},
                                         {"ids": ["a0", "a1"], "merge_strategy": "dare_linear", "density": 1e-300}])
                    status = (await http.post(url + "/generate", json={"inputs": "Hi", "parameters": {"merged_adapters": merged}})).status_code
                elif kind == "abandoned-merge":
                    ids = rng.sample([f"a{i}" for i in range(ADAPTERS)], 8)
                    merged = {"ids": ids, "weights": [rng.random() for _ in ids], "merge_strategy": "ties", "density": 0.5}
                    try:
                        await http.post(url + "/generate", json={"inputs": "Hi", "parameters": {"merged_adapters": merged}}, timeout=1.0)
                    except httpx.TimeoutException:
                        status = -1  # abandoned, as meant
                elif kind == "slow-schema":
                    response_format = {"type": "json_schema", "schema": slow_schema(rng.randint(20, 60))}
                    # sampled wide, so each token adds several characters: the pattern's mask then costs more every token
                    parameters = {"max_new_tokens": 48, "do_sample": True, "temperature": 50.0, "response_format": response_format}
                    status = (await http.post(url + "/generate", json={"inputs": "Hi", "parameters": parameters})).status_code
                elif kind == "warm-flood":
                    for replica in replicas:
                        status = (await http.post(replica + "/adapters/warm", json={"adapter_id": f"a{rng.randrange(ADAPTERS)}"})).status_code
                else:
                    status = (await http.get(rng.choice(replicas) + "/adapters/catalogue")).status_code
            except httpx.HTTPError:
                status = 0
            attacks.append((kind, status))


def attack_process(url: str, replicas: list[str], end: float, seed: float, kinds: tuple[str, ...], attackers: int, out: Any) -> None:
    """The attackers in a process of their own, as an attacker is another machine: in the normal clients' event
    loop, the attackers' own client work (thousands of requests a minute) delayed the normal clients' timestamps,
    and the bench measured itself. ``end`` is a ``time.monotonic()`` deadline (one clock for every process)."""
    attacks: list = []

    async def run() -> None:
        rng = random.Random(seed)
        await asyncio.gather(*(attacker(url, replicas, end, random.Random(rng.random()), attacks, kinds) for _ in range(attackers)))

    asyncio.run(run())
    times = os.times()
    out.put((attacks, times.user + times.system))


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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")


def p99s(results: list, skip_s: float, start: float) -> tuple[float, float]:
    """(p99 latency of answered non-streaming requests, p99 time to first token of full streams), after ``skip_s``."""
    rows = [r for r in results if r[0] - start >= skip_s]
    return (percentile([r[3] for r in rows if r[1] in VALID_NON_STREAMING and r[2] == 200], 0.99),
            percentile([r[4] for r in rows if r[1] == "stream-full" and r[4] is not None], 0.99))


def report(results: list, minute: int, start: float, fleet: Fleet, with_processes: bool = True) -> None:
    rows = [r for r in results if minute * 60 <= r[0] - start < (minute + 1) * 60]
    by_kind: dict[str, list] = defaultdict(list)
    for _, kind, status, seconds, _ in rows:
        by_kind[kind].append((status, seconds))
    answered = sum(status in KINDS[kind][1] for _, kind, status, _, _ in rows)
    lost = sum(status != 200 for _, kind, status, _, _ in rows if kind in VALID_NON_STREAMING)
    p99 = percentile([s for _, kind, status, s, _ in rows if kind in VALID_NON_STREAMING and status == 200], 0.99)
    stats = " ".join(f"{name}={rss:.0f}M/{fds}fd" for name, process in fleet.processes.items()
                     for rss, fds in [process_stats(process.pid)]) if with_processes else ""
    odd = {k: sorted({s for s, _ in v if s not in KINDS[k][1]}) for k, v in by_kind.items()}
    odd = {k: v for k, v in odd.items() if v}
    print(f"min {minute + 1:2d}  requests {len(rows):5d}  answered {answered:5d}  lost {lost:3d}  p99 {p99:6.2f}s  {stats}"
          + (f"  unexpected {odd}" if odd else ""), flush=True)


def run_soak(args: argparse.Namespace, model: Path, workdir: Path, attackers: int, label: str,
             kinds: tuple[str, ...] = ATTACKS) -> tuple[list, list, float]:
    """One soak on a fresh fleet: the per-minute table, the whole table, the lost requests; returns
    (results, attacks, start)."""
    fleet = Fleet(model, workdir / "adapters", workdir / label, args.replicas)
    (workdir / label).mkdir()
    fleet.start()
    try:
        fleet.wait_ready()
        print(f"\n[{label}] {args.replicas} replicas ({SLOTS} slots each, {ADAPTERS} adapters) + gateway, {args.clients} clients, "
              f"{attackers} attackers ({','.join(kinds) if attackers else '-'}), {args.minutes:g} min; logs in {workdir / label}", flush=True)
        results: list = []
        attacks: list = []
        seconds = args.minutes * 60
        start = time.monotonic()
        url = f"http://127.0.0.1:{fleet.gateway_port}"
        replicas = [f"http://127.0.0.1:{p}" for p in fleet.ports]
        if attackers:
            context = multiprocessing.get_context("spawn")
            out = context.Queue()
            hostile = context.Process(target=attack_process, args=(url, replicas, start + seconds, args.seed + 0.5, kinds, attackers, out), daemon=True)
            hostile.start()
        ours = os.times()

        async def run() -> None:
            rng = random.Random(args.seed)
            workers = [client(url, start + seconds, random.Random(rng.random()), results) for _ in range(args.clients)]

            async def minutes() -> None:
                for minute in range(int(args.minutes + 0.999)):
                    await asyncio.sleep(max(0.0, start + (minute + 1) * 60 - time.monotonic()))
                    report(results, minute, start, fleet)

            await asyncio.gather(*workers, chaos(fleet, start, seconds, print), minutes())

        asyncio.run(run())
        cpu = {name: cpu_seconds(process.pid) for name, process in fleet.processes.items()}
        now = os.times()
        cpu["normal clients"] = now.user + now.system - ours.user - ours.system
        if attackers:
            attacks, cpu["attackers"] = out.get(timeout=120)
            hostile.join(30)
        # Where the two cores went: an attacker's own client work is CPU this machine shares and a real one would not.
        print("CPU seconds over the run (a SIGKILLed replica's first life not counted): "
              + ", ".join(f"{name} {seconds:.0f}" for name, seconds in cpu.items()), flush=True)
        # The rows above were printed as each minute ended, before its slowest requests returned:
        # the table again with every request, then what the lost ones were.
        print("\nevery request, by the minute it started:")
        for minute in range(int(args.minutes + 0.999)):
            report(results, minute, start, fleet, with_processes=False)
        valid = [r for r in results if r[1] in VALID_NON_STREAMING]
        lost = [r for r in valid if r[2] != 200]
        print(f"total: {len(results)} requests, {len(valid)} valid non-streaming, lost {len(lost)}")
        for started, kind, status, took, _ in lost[:20]:
            print(f"  lost: t={started - start:6.1f}s {kind} status {status or 'no answer'} after {took:.1f}s")
        if attacks:
            by_kind: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
            for kind, status in attacks:
                by_kind[kind][status] += 1
            print("attacks (status: count; -1 abandoned, 0 no answer): "
                  + "; ".join(f"{kind} {dict(sorted(counts.items()))}" for kind, counts in sorted(by_kind.items())))
        return results, attacks, start
    finally:
        fleet.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--attackers", type=int, default=8, help="hostile clients beside the normal ones (0: none)")
    parser.add_argument("--baseline", action="store_true", help="first the same soak without attackers, then the ratios")
    parser.add_argument("--model", default="tiny", help="tiny (a random tiny Llama, fast) or smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="the attack kinds, comma-separated (default: all)")
    parser.add_argument("--each-attack", action="store_true", help="after the baseline, one soak per attack kind on its own")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (the processes' logs) instead of a temporary one")
    args = parser.parse_args()
    from lorafleet import model_store
    from lorafleet.testing import make_lora_adapter, make_tiny_model

    with (contextlib.nullcontext(str(args.keep)) if args.keep else tempfile.TemporaryDirectory(prefix="lorafleet-soak-")) as tmp:
        workdir = Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        model = make_tiny_model(workdir / "model") if args.model == "tiny" else model_store.resolve_model(args.model)
        for i in range(ADAPTERS):
            make_lora_adapter(model, workdir / "adapters" / f"a{i}", r=8, seed=i)
        kinds = tuple(k for k in args.attacks.split(",") if k)
        if unknown := set(kinds) - set(ATTACKS):
            parser.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
        baseline = run_soak(args, model, workdir, 0, "baseline") if (args.baseline or args.each_attack) and args.attackers else None
        groups = [(kind,) for kind in kinds] if args.each_attack else [kinds]
        attacked = {group: run_soak(args, model, workdir, args.attackers, "attacked-" + "-".join(group) if args.each_attack else "attacked", group)
                    for group in groups}
        if baseline is not None:
            base_latency, base_ttft = p99s(baseline[0], 30, baseline[2])
            for group, (hit, _, hit_start) in attacked.items():
                hit_latency, hit_ttft = p99s(hit, 30, hit_start)
                print(f"\nnormal clients under {','.join(group)}, p99 after the first 30 s: latency {base_latency:.2f}s -> {hit_latency:.2f}s "
                      f"({hit_latency / base_latency:.2f}x), stream TTFT {base_ttft:.2f}s -> {hit_ttft:.2f}s ({hit_ttft / base_ttft:.2f}x); "
                      "goal: within 2x")


if __name__ == "__main__":
    main()
