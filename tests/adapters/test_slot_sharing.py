"""Device slots under hostile churn: an adapter whose clients all left keeps no slot, and merged specs (a new adapter
per request, as an attacker sends them) take turns in their own share of the slots instead of evicting every tenant's
adapters (the hostile soak's abandoned merges: normal clients' stream TTFT 13x)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.adapters import manager as manager_module
from lorafleet.server.engine.sequence import FinishReason, SamplingParams
from lorafleet.server.lora.merge import MergeSpec
from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

PROMPT = [1, 5, 6, 7]
NAMES = ("s0", "s1", "s2")


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("slot-sharing")
    for i, name in enumerate(NAMES):
        make_lora_adapter(tiny_models["llama"], root / name, seed=60 + i, target_modules=["q_proj", "v_proj"])
    return root


def engine_with(tiny_models, adapters, tmp_path, **overrides):  # noqa: ANN001, ANN201
    settings = dict(adapter_roots=[adapters], adapter_cache_dir=tmp_path / "cache", max_lora_rank=16, adapter_cycle_time_s=30.0)
    return make_engine(tiny_models["llama"], **{**settings, **overrides})


def step_until(engine, done, timeout: float = 30) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, "timed out"
        engine.step()
        time.sleep(0.002)


def local(name: str) -> AdapterRef:
    return AdapterRef("local", name)


def test_an_adapter_whose_requests_all_left_gives_up_its_slot_at_once(tiny_models, adapters, tmp_path) -> None:
    """Brought in for requests that then hung up before they ran, an adapter protected its slot for a whole cycle
    (30 s here) and the next tenant's adapter waited that long."""
    engine = engine_with(tiny_models, adapters, tmp_path, max_active_adapters=2, max_running_requests=1)
    manager = engine.adapters
    engine.add_request(PROMPT, SamplingParams(max_new_tokens=200, ignore_eos=True))  # holds the only running place
    engine.step()
    left = [engine.add_request(PROMPT, SamplingParams(max_new_tokens=2), manager.request(local(n))) for n in NAMES[:2]]
    step_until(engine, lambda: all(manager.states[s.adapter].status == "device" for s in left))
    for seq in left:
        engine.cancel(seq)  # their clients hung up
    newcomer = manager.request(local(NAMES[2]))
    engine.add_request(PROMPT, SamplingParams(max_new_tokens=2), newcomer)
    step_until(engine, lambda: manager.states[newcomer].status == "device", timeout=10)


def test_merged_specs_take_turns_in_their_share_of_the_slots(tiny_models, adapters, tmp_path) -> None:
    engine = engine_with(tiny_models, adapters, tmp_path, max_active_adapters=4, adapter_cycle_time_s=0.05)
    manager = engine.adapters
    assert max(1, int(4 * manager_module.MERGED_SLOT_SHARE)) == 1
    tenants = [engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(local(n))) for n in NAMES]
    step_until(engine, lambda: all(s.finished for s in tenants))
    for i in range(6):  # a new spec each time: each is a new adapter wanting a slot
        spec = MergeSpec((local("s0"), local("s1")), (1.0, 0.1 * (i + 1)))
        seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(manager.merges.define(spec)))
        step_until(engine, lambda seq=seq: seq.finished)
        assert seq.finish_reason is not FinishReason.ERROR
        resident = set(manager.slots.slot_of)
        assert {f"local:{n}" for n in NAMES} <= resident  # every tenant's adapter kept its slot
        assert sum(k.startswith("merged:") for k in resident) == 1
    # A tenant's adapter still gets a slot as before (the share bounds merged adapters only; the victim is the LRU one).
    make_lora_adapter(tiny_models["llama"], adapters / "late", seed=70, target_modules=["q_proj", "v_proj"])
    seq = engine.add_request(PROMPT, SamplingParams(max_new_tokens=1), manager.request(local("late")))
    step_until(engine, lambda: seq.finished)
    assert "local:late" in manager.slots.slot_of
