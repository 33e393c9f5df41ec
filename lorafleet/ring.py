"""Adapter placement: which replicas own an adapter id, shared by the gateway and the operator.

Rendezvous (highest-random-weight) hashing rather than a ring of virtual nodes: each member's
score for a key is a keyed blake2b hash, and the owners are the members by descending score.
It needs no tuning (no virtual-node count), spreads keys as evenly as the hash does, and when one
of N members joins or leaves exactly the keys whose top owner it is move — about 1/N — while
everyone else's order is untouched. Lookups cost O(N) hashes, a few microseconds for the tens
of replicas a fleet has. blake2b, never Python's ``hash()``, so every process agrees.

Bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing with Bounded Loads"): no
request goes to a member whose in-flight count is at or over ``ceil(c * (total + 1) / N)``; the
paper then takes the first owner under it. With c = 1.25 no member is placed more than 25 % over
the mean (plus the rounding of ceil()).

Within that bound the pick is cache-aware, because a spill is where plain bounded loads lose
hits: an owner at the bound sends the request on to the next owner, which loads the adapter
cold and evicts another. So (1) a member known to hold the adapter hot and under the bound is
taken first, the least loaded of them; (2) otherwise the less loaded of the first two owners
under the bound (two choices, ties to the higher owner). Popular adapters then spread over the
replicas that already hold them, which leaves room on each owner for its own long tail.
bench/routing_sim.py measures what each step buys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TypeVar

DEFAULT_LOAD_FACTOR = 1.25
M = TypeVar("M")  # a member: a replica name, or an index in the simulation


def score(key: str, member: str) -> int:
    digest = hashlib.blake2b(key.encode(), digest_size=8, key=member.encode()[:64]).digest()
    return int.from_bytes(digest, "big")


def owners(key: str, members: Iterable[str], n: int | None = None) -> list[str]:
    """The members in preference order for ``key`` (the first ``n`` of them)."""
    ranked = sorted(members, key=lambda m: (score(key, m), m), reverse=True)
    return ranked if n is None else ranked[:n]


def load_bound(total_in_flight: int, num_members: int, load_factor: float = DEFAULT_LOAD_FACTOR, floor: int = 1) -> int:
    """No member takes a request at or over this many in flight. ``floor``: a member is never full below it
    (a replica batches a few requests as cheaply as one; at low load the paper's bound of ~1 would spill
    the second request for a popular adapter to a replica that must load it cold)."""
    return max(floor, math.ceil(load_factor * (total_in_flight + 1) / num_members))


def pick(key: str, loads: Mapping[str, int], load_factor: float = DEFAULT_LOAD_FACTOR, hot: Collection[str] = (),
         choices: int = 2, floor: int = 1) -> tuple[str, int]:
    """(member, rank among the key's owners) for a new request; no member at or over the bound is picked.

    ``hot``: the members believed to hold the key's adapter hot. ``choices=1`` is the paper's
    plain pick: the first owner under the bound.
    """
    if not loads:
        raise ValueError("no members to pick from")
    bound = load_bound(sum(loads.values()), len(loads), load_factor, floor)
    return choose(owners(key, loads), loads.__getitem__, bound, hot, choices)


def choose(ranked: Sequence[M], load: Callable[[M], int], bound: int, hot: Collection[M] = (), choices: int = 2,
           warm: Collection[M] = ()) -> tuple[M, int]:
    """The decision inside :func:`pick`, given the owners already ranked (the routing simulation calls it too).

    ``warm``: members holding the adapter in CPU memory (a copy to the device, not a read from disk):
    after the hot ones, before the two choices, which would otherwise send an adapter that left one
    owner's device to a second owner that must read it from disk."""
    eligible = [(load(m), rank, m) for rank, m in enumerate(ranked) if load(m) < bound]
    preferred = [entry for entry in eligible if entry[2] in hot] or [entry for entry in eligible if entry[2] in warm]
    _, rank, member = min(preferred or eligible[:choices])  # never empty while the bound exceeds the mean load
    return member, rank


def routing_order(key: str | None, loads: Mapping[str, int], load_factor: float = DEFAULT_LOAD_FACTOR,
                  hot: Collection[str] = (), ranked: Sequence[str] | None = None, floor: int = 1, warm: Collection[str] = ()) -> list[str]:
    """Every member in the order to try: the bounded-load pick first, then the other owners (failover).

    ``ranked``: the key's owners when the caller has them already (ranking costs N hashes and a sort).
    """
    if key is None:
        return sorted(loads, key=lambda m: (loads[m], m))
    ranked = owners(key, loads) if ranked is None else ranked
    first, _ = choose(ranked, loads.__getitem__, load_bound(sum(loads.values()), len(loads), load_factor, floor), hot, warm=warm)
    return [first] + [m for m in ranked if m != first]


MERGED_PREFIX = "merged:"


def merged_key(ids: Sequence[str]) -> str:
    return MERGED_PREFIX + ",".join(sorted(ids))


def merged_ids(key: str) -> list[str] | None:
    """The member ids a ``merged_key`` names; None for any other key."""
    return key.removeprefix(MERGED_PREFIX).split(",") if key.startswith(MERGED_PREFIX) else None
