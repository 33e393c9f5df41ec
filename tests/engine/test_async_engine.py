"""The threaded engine as the HTTP layer uses it: concurrent streams, validation errors, disconnects."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.server.engine.async_engine import AsyncEngine
from lorafleet.server.engine.sequence import FinishReason, SamplingParams


@pytest.fixture
def async_engine(tiny_models: dict[str, Path]):
    engine = AsyncEngine(make_engine(tiny_models["llama"]))
    engine.start()
    yield engine
    engine.stop()


async def collect(engine: AsyncEngine, prompt: list[int], params: SamplingParams) -> list:
    return [event async for event in engine.generate(prompt, params)]


async def test_concurrent_streams_match_their_solo_runs(async_engine: AsyncEngine, tiny_models: dict[str, Path]) -> None:
    prompts = [[1, 5, 6, 7], [1, 40, 41], [1, 9, 9, 9, 9, 9, 9]]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    results = await asyncio.gather(*(collect(async_engine, p, params) for p in prompts))
    for prompt, events in zip(prompts, results):
        solo = make_engine(tiny_models["llama"])
        seq = solo.add_request(prompt, params)
        solo.run_to_completion()
        assert [e.token.id for e in events] == seq.generated_ids
        assert events[-1].finish_reason is FinishReason.LENGTH and all(not e.finished for e in events[:-1])
        assert events[-1].seq.text == seq.text


async def test_validation_error_reaches_the_caller(async_engine: AsyncEngine) -> None:
    with pytest.raises(ValueError, match="must be <= 512"):
        await collect(async_engine, [1, 2, 3], SamplingParams(max_new_tokens=600))


async def test_a_consumer_that_walks_away_cancels_its_request(async_engine: AsyncEngine) -> None:
    total = async_engine.engine.allocator.num_free
    stream = async_engine.generate([1, 5, 6, 7], SamplingParams(max_new_tokens=400, ignore_eos=True))
    async for _ in stream:
        break
    await stream.aclose()
    for _ in range(100):
        if async_engine.num_requests == 0 and async_engine.engine.allocator.num_free == total:
            break
        await asyncio.sleep(0.02)
    assert async_engine.num_requests == 0
    assert async_engine.engine.allocator.num_free == total
