"""Routing policies compared by simulation (no servers): adapter hit rate and replica load balance.

Each replica holds 64 adapters in an LRU of device slots; 10,000 adapters are requested with Zipf
popularity; requests stay in flight for an exponentially distributed time (default mean: 32 per replica in
flight). Policies: lorafleet's gateway (consistent hashing with bounded loads, c = 1.25, cache-aware:
hot replicas first, else two choices among the owners under the bound; the gateway's view of who
holds what is exact here), the paper's plain bounded-load pick (first owner under the bound), plain
consistent hashing, round robin, least loaded; the ceiling is one fleet-wide LRU holding all the
slots. Load balance is max/mean in-flight, averaged over arrivals, and its peak.

    .venv/bin/python -P bench/routing_sim.py [--requests 60000]
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


def simulate(policy: str, replicas: int, stream: np.ndarray, durations: np.ndarray, owner_lists: list[list[int]]) -> tuple[float, float, float]:
    """(hit rate, mean of max/mean load, peak of max/mean load) of one policy over one request stream."""
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
            chosen, _ = ring.choose(owner_lists[adapter], loads.__getitem__, ring.load_bound(total, replicas), hot)
        elif policy == "bounded-plain":
            chosen, _ = ring.choose(owner_lists[adapter], loads.__getitem__, ring.load_bound(total, replicas), choices=1)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=60_000)
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT_PER_REPLICA, help="mean requests in flight per replica")
    args = parser.parse_args()
    policies = ["lorafleet", "bounded-plain", "consistent", "round-robin", "least-loaded", "ceiling"]
    print(f"{ADAPTERS} adapters, {SLOTS} slots per replica, {args.requests} requests, ~{args.in_flight} in flight per replica")
    print("hit: adapter hit rate; /ceiling and /rr: over the ceiling's and round robin's; load: max/mean in flight, mean and peak")
    for replicas in (16, 64):
        members = [f"replica-{i}" for i in range(replicas)]
        index = {m: i for i, m in enumerate(members)}
        owner_lists = [[index[m] for m in ring.owners(f"adapter-{a}", members)] for a in range(ADAPTERS)]
        for exponent in (0.8, 1.0, 1.2):
            rng = np.random.default_rng(int(exponent * 10) + replicas)
            weights = 1.0 / np.arange(1, ADAPTERS + 1) ** exponent
            stream = rng.permutation(ADAPTERS)[rng.choice(ADAPTERS, size=args.requests, p=weights / weights.sum())]
            durations = rng.exponential(args.in_flight * replicas, size=args.requests)
            results = {p: simulate(p, replicas, stream, durations, owner_lists) for p in policies}
            ceiling, rr = results["ceiling"][0], results["round-robin"][0]
            print(f"\n{replicas} replicas, Zipf {exponent}: round robin's hit rate {rr:.3f} caps any policy at {1 / rr:.2f}x it")
            for name, (hit, mean_load, peak_load) in results.items():
                print(f"  {name:>14}  hit {hit:5.3f}  /ceiling {hit / ceiling:5.3f}  /rr {hit / rr:5.2f}  load {mean_load:5.2f} / {peak_load:5.2f}",
                      flush=True)
    print("\nload peak: after the first 10 % of arrivals; ceil() in the bound lets one replica reach ceil(1.25 * mean)")


if __name__ == "__main__":
    main()
