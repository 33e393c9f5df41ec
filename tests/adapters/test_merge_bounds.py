"""Merged adapters cannot crowd out anyone else: their own small pool, a cost bound, cancellation when nobody waits,
and a bounded share of the CPU tier, of the device slots and of the replica's state (the third adversarial run: abandoned
16-member merges held the hub pool for minutes, and ~350 distinct specs evicted every tenant's real adapters; in the hostile
soak, abandoned specs each held a device slot for a whole cycle: normal clients' stream TTFT 13x)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.adapters import admission as admission_module
from lorafleet.server.adapters import manager as manager_module
from lorafleet.server.engine.sequence import FinishReason, SamplingParams
from lorafleet.server.errors import Overloaded
from lorafleet.server.lora import merge as merge_module
from lorafleet.server.lora.merge import MergeCancelled, MergeError, MergeSpec
from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

PROMPT = [1, 5, 6, 7]
NAMES = ("m0", "m1", "m2")


@pytest.fixture(scope="module")
def members(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("merge-bound-members")
    for i, name in enumerate(NAMES):
        make_lora_adapter(tiny_models["llama"], root / name, seed=40 + i, target_modules=["q_proj", "v_proj"])
    return root


def engine_for(tiny_models, members, tmp_path, **overrides):  # noqa: ANN001, ANN201
    settings = dict(adapter_roots=[members], adapter_cache_dir=tmp_path / "cache", max_active_adapters=2, max_lora_rank=16)
    return make_engine(tiny_models["llama"], **{**settings, **overrides})


def spec(weight: float, names: tuple[str, ...] = NAMES) -> MergeSpec:
    return MergeSpec(tuple(AdapterRef("local", n) for n in names), (1.0, 0.5, weight)[-len(names):])


def run_until(engine, done, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        if not engine.step():
            time.sleep(0.005)


def test_a_merge_nobody_waits_for_stops_and_a_later_request_merges_again(tiny_models, members, tmp_path, monkeypatch) -> None:
    engine = engine_for(tiny_models, members, tmp_path)
    manager = engine.adapters
    real_member = manager._member
    monkeypatch.setattr(manager, "_member", lambda ref, token: (time.sleep(0.4), real_member(ref, token))[1])  # a slow merge
    key = manager.request(manager.merges.define(spec(0.5)))
    seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=2), key)
    engine.step()
    engine.cancel(seq)  # the client left
    run_until(engine, lambda: manager.states[key].status == "failed")
    assert isinstance(manager.states[key].error, MergeCancelled) and manager.counts["merges"] == 0
    again = engine.add_request(PROMPT, SamplingParams(max_new_tokens=2, ignore_eos=True), manager.request(manager.merges.define(spec(0.5))))
    run_until(engine, lambda: again.finished)
    assert again.finish_reason is FinishReason.LENGTH and manager.counts["merges"] == 1


def test_merges_queue_on_their_own_pool_with_a_bound(tiny_models, members, tmp_path, monkeypatch) -> None:
    engine = engine_for(tiny_models, members, tmp_path)
    manager = engine.adapters
    real_member = manager._member
    monkeypatch.setattr(manager, "_member", lambda ref, token: (time.sleep(0.3), real_member(ref, token))[1])
    waiting = []
    for i in range(admission_module.MAX_PENDING_MERGES):
        key = manager.request(manager.merges.define(spec(0.1 * (i + 1))))
        waiting.append(engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), key))
    with pytest.raises(Overloaded, match="adapter merges are already running or queued"):
        manager.request(manager.merges.define(spec(0.9)))
    local = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(AdapterRef("local", "m0")))
    run_until(engine, lambda: local.finished)  # a plain adapter loads while merges queue
    assert sum(s.finished for s in waiting) < len(waiting)
    run_until(engine, lambda: all(s.finished for s in waiting))
    assert all(s.finish_reason is not FinishReason.ERROR for s in waiting)


def test_a_merge_over_the_cost_bound_is_refused_before_combining(tiny_models, members, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(merge_module, "MAX_MERGE_PARAMETERS", 1000)
    engine = engine_for(tiny_models, members, tmp_path)
    seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), engine.adapters.request(engine.adapters.merges.define(spec(0.5))))
    run_until(engine, lambda: seq.finished)
    assert isinstance(seq.error, MergeError) and "a merge may combine at most 1,000" in str(seq.error)


def test_distinct_specs_keep_to_their_share_of_the_cpu_tier_and_of_the_state(tiny_models, members, tmp_path, monkeypatch) -> None:
    """Every distinct spec is a new merged adapter: they evict each other, never the real adapters, and old ones are forgotten."""
    monkeypatch.setattr(manager_module, "MAX_MERGED_STATES", 4)
    probe = engine_for(tiny_models, members, tmp_path / "probe")
    size = probe.adapters.load_now("probe", members / "m0").size_bytes
    engine = engine_for(tiny_models, members, tmp_path, adapter_cpu_memory=12 * size)  # merged: at most 3 of them
    manager = engine.adapters
    bystander = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(AdapterRef("local", "m2")))
    run_until(engine, lambda: bystander.finished)  # a tenant's real adapter, in the CPU tier before the flood
    for i in range(12):
        merged = manager.merges.define(spec(0.01 * (i + 1), NAMES[:2]))
        seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(merged))
        run_until(engine, lambda seq=seq: seq.finished)
        assert seq.finish_reason is not FinishReason.ERROR
    cached = manager.cpu.keys()
    assert {f"local:{n}" for n in NAMES} <= set(cached)  # real adapters (the bystander, the members) were never evicted
    merged = [k for k in cached if k.startswith("merged:")]
    assert 0 < len(merged) <= 3 and sum(manager.cpu.get(k).size_bytes for k in merged) <= manager.cpu.merged_bytes
    assert len([k for k in manager.states if k.startswith("merged:")]) <= 4 + 2  # the bound, plus at most the slots' residents


def test_merges_run_below_the_engines_priority(tiny_models, members, tmp_path) -> None:
    """A stream of merges gets only the CPU the engine leaves (its threads, and the threads torch starts from them)."""
    import os
    import threading

    from lorafleet.server.background import NICENESS

    engine = engine_for(tiny_models, members, tmp_path)
    ours = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    merge_thread = engine.adapters._merge_pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert merge_thread == min(19, ours + NICENESS)  # the kernel caps it at 19


def test_one_identified_caller_holds_at_most_half_the_merge_queue(tiny_models, members, tmp_path, monkeypatch) -> None:
    """Callers the gateway identified (their cache salt, one per API key) get a share each: one cannot take every place."""
    engine = engine_for(tiny_models, members, tmp_path)
    manager = engine.adapters
    real_member = manager._member
    monkeypatch.setattr(manager, "_member", lambda ref, token: (time.sleep(0.3), real_member(ref, token))[1])
    share = admission_module.MAX_PENDING_MERGES_PER_CALLER
    waiting = []
    for i in range(share):
        key = manager.request(manager.merges.define(spec(0.1 * (i + 1))), caller=b"tenant-a")
        waiting.append(engine.add_request(PROMPT, SamplingParams(max_new_tokens=1, cache_salt=b"tenant-a"), key))
    with pytest.raises(Overloaded, match="this caller has 2 adapter merges running or queued already"):
        manager.request(manager.merges.define(spec(0.7)), caller=b"tenant-a")
    other = manager.request(manager.merges.define(spec(0.8)), caller=b"tenant-b")  # another caller still gets a place
    waiting.append(engine.add_request(PROMPT, SamplingParams(max_new_tokens=1, cache_salt=b"tenant-b"), other))
    run_until(engine, lambda: all(s.finished for s in waiting))
    assert all(s.finish_reason is not FinishReason.ERROR for s in waiting)
    manager.request(manager.merges.define(spec(0.7)), caller=b"tenant-a")  # its merges done, its share is back


def test_an_adapter_whose_requests_all_left_gives_up_its_slot_at_once(tiny_models, members, tmp_path) -> None:
    """Brought in for requests that then hung up before they ran, an adapter protected its slot for a whole cycle
    (30 s here) and the next tenant's adapter waited that long."""
    engine = engine_for(tiny_models, members, tmp_path, adapter_cycle_time_s=30.0, max_active_adapters=2, max_running_requests=1)
    manager = engine.adapters
    engine.add_request(PROMPT, SamplingParams(max_new_tokens=200, ignore_eos=True))  # holds the only running place
    engine.step()
    left = [engine.add_request(PROMPT, SamplingParams(max_new_tokens=2), manager.request(AdapterRef("local", n))) for n in NAMES[:2]]
    run_until(engine, lambda: all(manager.states[s.adapter].status == "device" for s in left))
    for seq in left:
        engine.cancel(seq)  # their clients hung up
    newcomer = manager.request(AdapterRef("local", NAMES[2]))
    engine.add_request(PROMPT, SamplingParams(max_new_tokens=2), newcomer)
    run_until(engine, lambda: manager.states[newcomer].status == "device", timeout=10)


def test_merged_specs_take_turns_in_their_share_of_the_slots(tiny_models, members, tmp_path) -> None:
    engine = engine_for(tiny_models, members, tmp_path, max_active_adapters=4, adapter_cycle_time_s=0.05)
    manager = engine.adapters
    assert max(1, int(4 * manager_module.MERGED_SLOT_SHARE)) == 1
    tenants = [engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(AdapterRef("local", n))) for n in NAMES]
    run_until(engine, lambda: all(s.finished for s in tenants))
    for i in range(6):  # a new spec each time: each is a new adapter wanting a slot
        merged = manager.merges.define(spec(0.1 * (i + 1), NAMES[:2]))
        seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(merged))
        run_until(engine, lambda seq=seq: seq.finished)
        assert seq.finish_reason is not FinishReason.ERROR
        resident = set(manager.slots.slot_of)
        assert {f"local:{n}" for n in NAMES} <= resident  # every tenant's adapter kept its slot
        assert sum(k.startswith("merged:") for k in resident) == 1
    # A tenant's adapter still gets a slot as before (the share bounds merged adapters only; the victim is the LRU one).
    make_lora_adapter(tiny_models["llama"], members / "late", seed=70, target_modules=["q_proj", "v_proj"])
    seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(AdapterRef("local", "late")))
    run_until(engine, lambda: seq.finished)
    assert "local:late" in manager.slots.slot_of
