"""One request's failure stays its own: the rest of its batch goes on and the replica stays healthy.

Validation refuses the values that once poisoned a replica (tests/api/test_server_hostile.py); these
tests hand the engine such values directly, past validation, to show it survives whatever gets
through: a request whose row cannot be sampled ends with an error, the others in the same step
produce exactly the tokens they produce alone.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.server.engine.async_engine import UNHEALTHY_AFTER_FAILED_STEPS, AsyncEngine
from lorafleet.server.engine.sampler import SamplingError
from lorafleet.server.engine.sequence import FinishReason, SamplingParams

GOOD = SamplingParams(max_new_tokens=8, ignore_eos=True)
PROMPT = [1, 5, 6, 7]


class ExplodingGrammar:
    def start(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def mask(self, scores) -> None:  # noqa: ANN001
        raise RuntimeError("grammar matcher crashed")

    def accept(self, token_id: int) -> None:
        pass


def poisoned(kind: str) -> SamplingParams:
    if kind == "nan temperature":
        return SamplingParams(max_new_tokens=8, temperature=float("nan"), do_sample=True)
    if kind == "denormal temperature":
        return SamplingParams(max_new_tokens=8, temperature=1e-45, do_sample=True)
    if kind == "nan repetition penalty":
        return SamplingParams(max_new_tokens=8, repetition_penalty=float("nan"))
    if kind == "nan frequency penalty":
        return SamplingParams(max_new_tokens=8, frequency_penalty=float("nan"), do_sample=True)
    return SamplingParams(max_new_tokens=8)


@pytest.mark.parametrize("kind", ["nan temperature", "denormal temperature", "nan repetition penalty", "nan frequency penalty", "grammar crash"])
def test_a_row_that_cannot_be_sampled_fails_alone(tiny_models: dict[str, Path], kind: str) -> None:
    solo = make_engine(tiny_models["llama"])
    expected = solo.add_request(PROMPT, GOOD)
    solo.run_to_completion()

    engine = make_engine(tiny_models["llama"])
    free = engine.allocator.num_free
    before = engine.add_request(PROMPT, GOOD)
    bad = engine.add_request([1, 9, 10, 11], poisoned(kind))
    if kind == "grammar crash":
        bad.constraint = ExplodingGrammar()
    after = engine.add_request(PROMPT, GOOD)
    engine.run_to_completion()
    assert bad.finish_reason is FinishReason.ERROR and isinstance(bad.error, SamplingError)
    assert before.generated_ids == expected.generated_ids == after.generated_ids
    assert before.finish_reason is after.finish_reason is FinishReason.LENGTH
    assert engine.allocator.num_free == free


async def test_a_failed_step_fails_its_requests_but_not_the_replica(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Health turns red only when steps keep failing, and green again once one succeeds."""
    engine = make_engine(tiny_models["llama"])
    runner = AsyncEngine(engine)
    runner.start()
    try:
        real_forward, failures = engine.runner.model.forward, {"left": 1}

        def flaky_forward(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            if failures["left"] > 0:
                failures["left"] -= 1
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return real_forward(*args, **kwargs)

        monkeypatch.setattr(engine.runner.model, "forward", flaky_forward)
        with pytest.raises(RuntimeError, match="illegal memory access"):
            [e async for e in runner.generate(PROMPT, GOOD)]
        assert runner.healthy and runner.consecutive_failures == 1
        events = [e async for e in runner.generate(PROMPT, GOOD)]
        assert events[-1].finish_reason is FinishReason.LENGTH and runner.consecutive_failures == 0

        failures["left"] = UNHEALTHY_AFTER_FAILED_STEPS
        for _ in range(UNHEALTHY_AFTER_FAILED_STEPS):
            with pytest.raises(RuntimeError):
                [e async for e in runner.generate(PROMPT, GOOD)]
        assert not runner.healthy
        events = [e async for e in runner.generate(PROMPT, GOOD)]
        assert events[-1].finish_reason is FinishReason.LENGTH and runner.healthy
        await asyncio.sleep(0)
    finally:
        runner.stop()
