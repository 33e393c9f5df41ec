"""Routing policies compared by simulation (no servers): adapter hit rate and replica load balance.

Each replica holds 64 adapters in an LRU of device slots; 10,000 adapters are requested with Zipf
popularity; requests stay in flight for an exponentially distributed time (default mean: 32 per replica in
flight). Policies: lorafleet's gateway (consistent hashing with bounded loads, c = 1.25, cache-aware:
hot replicas first, else two choices among the owners under the bound; the gateway's view of who
holds what is exact here), the paper's plain bounded-load pick (first owner under the bound), plain
consistent hashing, round robin, least loaded; the ceiling is one fleet-wide LRU holding all the
slots. Load balance is max/mean in-flight, averaged over arrivals, and its peak.

Several gateways (``--gateways 1,2,4``): requests reach the gateways in turn, as a Service spreads
them; each gateway bounds loads on its own in-flight counts only (the gateways share nothing), and
all read the same hot sets (each replica's probe answer). Each gateway alone keeps every replica
under ceil(c * (its total + 1) / N), so the sum over G gateways is at most c * (mean + G / N) + G:
the bound loosens by about one request per gateway, and placement (the ring) stays the same.

    .venv/bin/python -P bench/routing_sim.py [--requests 60000] [--gateways 1,2,4]
"""

from __future__ import annotations

import argparse
import heapq
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorafleet import ring  # noqa: E402

ADAPTERS, SLOTS = 10_000, 64
IN_FLIGHT_PER_REPLICA = 32  # a replica batches tens of requests at once


class Lru:
    def __init__(self, size: int) -> None:
        self.size, self.items = size, OrderedDict()

    def hit(self, key: int) -> bool:
        if key in self.items:
            self.items.move_to_end(key)
            return True
        self.items[key] = None
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return False


def simulate(policy: str, replicas: int, stream: np.ndarray, durations: np.ndarray, owner_lists: list[list[int]],
             floor: int = 1) -> tuple[float, float, float]:
    """(hit rate, mean of max/mean load, peak of max/mean load) of one policy over one request stream.

    ``floor``: the gateway's --min-bound (a replica is never full below it); 1 is the paper's bound."""
    caches = [Lru(SLOTS) for _ in range(replicas)] if policy != "ceiling" else [Lru(SLOTS * replicas)]
    loads = [0] * replicas
    ends: list[tuple[float, int]] = []
    hits, ratio_sum, peak, rr = 0, 0.0, 0.0, 0
    for t, (adapter, duration) in enumerate(zip(stream.tolist(), durations.tolist())):
        while ends and ends[0][0] <= t:
            loads[heapq.heappop(ends)[1]] -= 1
        total = sum(loads)
        if policy == "lorafleet":
            hot = [r for r in range(replicas) if adapter in caches[r].items]
            chosen, _ = ring.choose(owner_lists[adapter], loads.__getitem__, ring.load_bound(total, replicas, floor=floor), hot)
        elif policy == "bounded-plain":
            chosen, _ = ring.choose(owner_lists[adapter], loads.__getitem__, ring.load_bound(total, replicas, floor=floor), choices=1)
        elif policy == "consistent":
            chosen = owner_lists[adapter][0]
        elif policy == "round-robin":
            chosen, rr = rr % replicas, rr + 1
        elif policy == "least-loaded":
            chosen = min(range(replicas), key=loads.__getitem__)
        else:  # ceiling: one cache, spread the load perfectly
            chosen = min(range(replicas), key=loads.__getitem__)
        hits += caches[0 if policy == "ceiling" else chosen].hit(adapter)
        loads[chosen] += 1
        heapq.heappush(ends, (t + duration, chosen))
        mean = (total + 1) / replicas
        ratio = max(loads) / mean
        ratio_sum += ratio
        peak = max(peak, ratio) if t > len(stream) // 10 else peak  # skip the warm-up when few are in flight
    return hits / len(stream), ratio_sum / len(stream), peak


def simulate_gateways(gateways: int, replicas: int, stream: np.ndarray, durations: np.ndarray, owner_lists: list[list[int]],
                      load_factor: float = ring.DEFAULT_LOAD_FACTOR) -> tuple[float, float, float, float]:
    """lorafleet's policy with ``gateways`` independent gateways: (hit rate, mean and peak max/mean load,
    the largest excess of the picked replica's load, at the pick, over the guarantee c * (mean + G / N) + G)."""
    caches = [Lru(SLOTS) for _ in range(replicas)]
    views = [[0] * replicas for _ in range(gateways)]  # each gateway's own in-flight per replica
    loads = [0] * replicas
    ends: list[tuple[float, int, int]] = []
    hits, ratio_sum, peak, excess = 0, 0.0, 0.0, -float("inf")
    for t, (adapter, duration) in enumerate(zip(stream.tolist(), durations.tolist())):
        while ends and ends[0][0] <= t:
            _, g, r = heapq.heappop(ends)
            views[g][r] -= 1
            loads[r] -= 1
        g = t % gateways
        own = views[g]
        hot = [r for r in range(replicas) if adapter in caches[r].items]
        chosen, _ = ring.choose(owner_lists[adapter], own.__getitem__, ring.load_bound(sum(own), replicas, load_factor), hot)
        hits += caches[chosen].hit(adapter)
        own[chosen] += 1
        loads[chosen] += 1
        heapq.heappush(ends, (t + duration, g, chosen))
        mean = sum(loads) / replicas
        ratio = max(loads) / mean
        ratio_sum += ratio
        if t > len(stream) // 10:
            peak = max(peak, ratio)
            # The guarantee is about each pick (later departures elsewhere can lower the mean under an older pick).
            excess = max(excess, loads[chosen] - (load_factor * (mean + gateways / replicas) + gateways))
    return hits / len(stream), ratio_sum / len(stream), peak, excess


def ring_owners(replicas: int) -> list[list[int]]:
    """Each adapter's replicas in ring order, as indices."""
    members = [f"replica-{i}" for i in range(replicas)]
    index = {m: i for i, m in enumerate(members)}
    return [[index[m] for m in ring.owners(f"adapter-{a}", members)] for a in range(ADAPTERS)]


def workload(replicas: int, exponent: float, args: argparse.Namespace, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A Zipf(exponent) stream of adapter ids and how long each request stays in flight."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, ADAPTERS + 1) ** exponent
    stream = rng.permutation(ADAPTERS)[rng.choice(ADAPTERS, size=args.requests, p=weights / weights.sum())]
    return stream, rng.exponential(args.in_flight * replicas, size=args.requests)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT_PER_REPLICA, help="mean requests in flight per replica")
    parser.add_argument("--gateways", default="", help="comma-separated gateway counts to compare instead of the policies (e.g. 1,2,4)")
    args = parser.parse_args()
    if args.gateways:
        return compare_gateways(args, [int(g) for g in args.gateways.split(",")])
    policies = ["lorafleet", "bounded-plain", "consistent", "round-robin", "least-loaded", "ceiling"]
    print(f"{ADAPTERS} adapters, {SLOTS} slots per replica, {args.requests} requests, ~{args.in_flight} in flight per replica")
    print("hit: adapter hit rate; /ceiling and /rr: over the ceiling's and round robin's; load: max/mean in flight, mean and peak")
    for replicas in (16, 64):
        owner_lists = ring_owners(replicas)
        for exponent in (0.8, 1.0, 1.2):
            stream, durations = workload(replicas, exponent, args, seed=int(exponent * 10) + replicas)
            results = {p: simulate(p, replicas, stream, durations, owner_lists) for p in policies}
            ceiling, rr = results["ceiling"][0], results["round-robin"][0]
            print(f"\n{replicas} replicas, Zipf {exponent}: round robin's hit rate {rr:.3f} caps any policy at {1 / rr:.2f}x it")
            for name, (hit, mean_load, peak_load) in results.items():
                print(f"  {name:>14}  hit {hit:5.3f}  /ceiling {hit / ceiling:5.3f}  /rr {hit / rr:5.2f}  load {mean_load:5.2f} / {peak_load:5.2f}",
                      flush=True)
    print("\nload peak: after the first 10 % of arrivals; ceil() in the bound lets one replica reach ceil(1.25 * mean)")


def compare_gateways(args: argparse.Namespace, counts: list[int]) -> None:
    print(f"{ADAPTERS} adapters, {SLOTS} slots per replica, {args.requests} requests, ~{args.in_flight} in flight per replica")
    print("gateways share nothing; excess: the picked replica's load at each pick minus c * (mean + G/N) + G (<= 0: the guarantee held)")
    for replicas in (16, 64):
        owner_lists = ring_owners(replicas)
        stream, durations = workload(replicas, 1.0, args, seed=replicas)
        print(f"\n{replicas} replicas, Zipf 1.0")
        for gateways in counts:
            hit, mean_load, peak_load, excess = simulate_gateways(gateways, replicas, stream, durations, owner_lists)
            print(f"  {gateways} gateway(s)  hit {hit:5.3f}  load {mean_load:5.2f} / {peak_load:5.2f}  excess {excess:+6.2f}", flush=True)


if __name__ == "__main__":
    main()
