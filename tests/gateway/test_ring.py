"""The placement ring's properties, checked with hypothesis."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet import ring

member_names = st.lists(st.from_regex(r"replica-[a-z0-9]{1,8}", fullmatch=True), min_size=2, max_size=24, unique=True)
KEYS = [f"org/adapter-{i}" for i in range(3000)]


def test_owners_are_the_same_in_separate_processes() -> None:
    members = [f"lorafleet-replica-{i}" for i in range(7)]
    code = "from lorafleet import ring; import json; print(json.dumps([ring.owners(f'k{i}', " + repr(members) + ", 3) for i in range(200)]))"
    outputs = {subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True, check=True,
                              env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout for seed in ("1", "2")}
    assert len(outputs) == 1
    import json

    assert json.loads(outputs.pop()) == [ring.owners(f"k{i}", members, 3) for i in range(200)]


@settings(max_examples=30, deadline=None)
@given(members=member_names, newcomer=st.from_regex(r"new-[a-z]{1,6}", fullmatch=True))
def test_adding_a_member_moves_only_its_share(members: list[str], newcomer: str) -> None:
    before = {k: ring.owners(k, members, 1)[0] for k in KEYS}
    after = {k: ring.owners(k, members + [newcomer], 1)[0] for k in KEYS}
    moved = [k for k in KEYS if before[k] != after[k]]
    assert all(after[k] == newcomer for k in moved)  # keys only ever move to the newcomer
    share = 1 / (len(members) + 1)
    assert len(moved) <= len(KEYS) * share * 1.5 + 30  # about 1/N, with room for hash noise on 3,000 keys


@settings(max_examples=30, deadline=None)
@given(members=member_names, data=st.data())
def test_removing_a_member_moves_only_its_keys(members: list[str], data: st.DataObject) -> None:
    gone = data.draw(st.sampled_from(members))
    rest = [m for m in members if m != gone]
    for key in KEYS[:1000]:
        order = ring.owners(key, members)
        assert ring.owners(key, rest) == [m for m in order if m != gone]  # everyone else keeps their order


def test_keys_spread_evenly() -> None:
    members = [f"replica-{i}" for i in range(16)]
    counts = Counter(ring.owners(k, members, 1)[0] for k in [f"adapter-{i}" for i in range(32000)])
    mean = 32000 / 16
    assert max(counts.values()) <= mean * 1.10 and min(counts.values()) >= mean * 0.90  # within ±10 %


@settings(max_examples=50, deadline=None)
@given(members=member_names, keys=st.lists(st.integers(0, 40), min_size=1, max_size=300), factor=st.sampled_from([1.1, 1.25, 2.0]),
       data=st.data())
def test_bounded_loads_never_exceed_the_bound(members: list[str], keys: list[int], factor: float, data: st.DataObject) -> None:
    loads = {m: 0 for m in members}
    for k in keys:  # every request stays in flight: the worst case for the bound
        hot = data.draw(st.sets(st.sampled_from(members), max_size=3))  # whatever the gateway believes is hot
        bound = ring.load_bound(sum(loads.values()), len(loads), factor)
        chosen, _ = ring.pick(f"adapter-{k}", loads, factor, hot)
        assert loads[chosen] < bound
        loads[chosen] += 1
        assert max(loads.values()) <= ring.load_bound(sum(loads.values()) - 1, len(loads), factor)


def test_pick_prefers_a_hot_replica_then_the_less_loaded_of_two_owners() -> None:
    members = [f"replica-{i}" for i in range(6)]
    first, second, third, *_ = ring.owners("adapter-x", members)
    idle = {m: 0 for m in members}
    assert ring.pick("adapter-x", idle) == (first, 0)  # nothing hot, loads equal: the top owner
    assert ring.pick("adapter-x", idle, hot={third}) == (third, 2)  # the replica that holds it hot
    busy = {**idle, first: 2, second: 1}  # total 3: bound ceil(1.25 * 4 / 6) = 1
    assert ring.pick("adapter-x", busy, hot={first}) == (third, 2)  # hot but at the bound: the bound wins
    loads = {m: 3 for m in members} | {first: 4, second: 3}  # total 19: bound 5, both owners eligible
    assert ring.pick("adapter-x", loads) == (second, 1)  # two choices: the less loaded of the first two
    assert ring.pick("adapter-x", loads, choices=1) == (first, 0)  # the paper's plain pick
    assert ring.pick("adapter-x", loads, hot={first, third}) == (third, 2)  # the least loaded hot one


def test_routing_order_tries_every_member_once_and_no_key_means_least_loaded() -> None:
    loads = {"a": 3, "b": 0, "c": 1}
    order = ring.routing_order("adapter-x", loads)
    assert sorted(order) == ["a", "b", "c"]
    assert ring.routing_order(None, loads) == ["b", "c", "a"]
    assert ring.merged_key(["z", "a"]) == "merged:a,z"


def test_a_floor_keeps_a_popular_adapter_on_its_owner_at_low_load() -> None:
    members = [f"replica-{i}" for i in range(3)]
    first, second, _ = ring.owners("adapter-x", members)
    loads = {m: 0 for m in members} | {first: 1}  # total 1: the paper's bound is ceil(1.25 * 2 / 3) = 1
    assert ring.load_bound(1, 3) == 1 and ring.load_bound(1, 3, floor=4) == 4
    assert ring.pick("adapter-x", loads, hot={first}) == (second, 1)  # without a floor the second request spills, cold
    assert ring.pick("adapter-x", loads, hot={first}, floor=4) == (first, 0)  # with it, it joins the first one's batch
    assert ring.routing_order("adapter-x", loads, hot={first}, floor=4)[0] == first
    busy = {m: 0 for m in members} | {first: 9}  # total 9: bound ceil(1.25 * 10 / 3) = 5 > floor: the bound rules again
    assert ring.pick("adapter-x", busy, hot={first}, floor=4)[0] != first


def test_a_replica_holding_the_adapter_in_cpu_memory_comes_before_the_two_choices() -> None:
    members = [f"replica-{i}" for i in range(4)]
    first, second, third, _ = ring.owners("adapter-x", members)
    loads = {m: 0 for m in members} | {first: 2}  # the top owner is busier: two choices would pick the second
    assert ring.routing_order("adapter-x", loads, floor=4)[0] == second
    assert ring.routing_order("adapter-x", loads, floor=4, warm={first})[0] == first  # it still holds it in memory: no disk read
    assert ring.routing_order("adapter-x", loads, floor=4, warm={first}, hot={third})[0] == third  # hot on a device beats warm
    assert ring.routing_order("adapter-x", {m: 0 for m in members} | {first: 9}, floor=4, warm={first})[0] != first  # the bound still rules
