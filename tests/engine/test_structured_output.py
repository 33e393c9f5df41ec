"""Structured output: generations constrained to a JSON schema are valid JSON of that schema."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.server.engine.sequence import FinishReason, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {"color": {"enum": ["red", "green", "blue"]}, "size": {"enum": [1, 2, 3]}, "ok": {"type": "boolean"}},
    "required": ["color", "size", "ok"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, temperature=1.5, seed=7)], ids=["greedy", "sampled"])
def test_schema_constrained_output_parses_and_matches(tiny_models: dict[str, Path], sampling: dict) -> None:
    engine = make_engine(tiny_models["llama"])
    fmt = {"type": "json_schema", "schema": SCHEMA}
    seqs = [engine.add_request([1, 5 + i, 6], SamplingParams(max_new_tokens=60, response_format=fmt, **sampling)) for i in range(4)]
    free = engine.add_request([1, 5, 6], SamplingParams(max_new_tokens=10))  # an unconstrained neighbour in the batch
    engine.run_to_completion()
    for seq in seqs:
        assert seq.finish_reason is FinishReason.EOS, seq.text
        value = json.loads(seq.text)
        assert set(value) == {"color", "size", "ok"}
        assert value["color"] in ("red", "green", "blue") and value["size"] in (1, 2, 3) and isinstance(value["ok"], bool)
    assert len(free.generated_ids) == 10


def test_json_object_mode_gives_an_object(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["qwen2"])
    seq = engine.add_request([1, 9, 9], SamplingParams(max_new_tokens=30, response_format={"type": "json_object", "schema": None}))
    engine.run_to_completion()
    assert seq.text.startswith("{")
    if seq.finish_reason is FinishReason.EOS:  # closed: a whole JSON object
        assert isinstance(json.loads(seq.text), dict)
    else:  # a random model may not close it within 30 tokens, but every token must extend a valid JSON prefix
        import xgrammar as xgr

        info = xgr.TokenizerInfo.from_huggingface(engine.tokenizer, vocab_size=engine.runner.model_config.vocab_size)
        matcher = xgr.GrammarMatcher(xgr.GrammarCompiler(info).compile_builtin_json_grammar())
        assert all(matcher.accept_token(t) for t in seq.generated_ids), seq.text


def test_an_invalid_schema_is_a_clear_error(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"])
    with pytest.raises(ValueError, match="`response_format` schema is not valid"):
        engine.add_request([1, 5], SamplingParams(response_format={"type": "json_schema", "schema": {"type": 5}}))


async def test_a_slow_schema_compile_stalls_no_other_stream(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiling happens off the engine thread, in a worker process: a stream running meanwhile keeps its pace, a
    compile over the time budget fails its own request only (422), and its worker is killed, so other clients'
    schemas compile at once right after (a timed-out compile on a thread kept running and failed them all)."""
    import time

    import httpx
    from support.server import RunningServer

    from lorafleet.server.api import service as service_module

    monkeypatch.setattr(service_module, "GRAMMAR_TIMEOUT_S", 1.5)
    # 40 bytes that xgrammar compiles for 3.3 s on this 384-token vocabulary (one level less, over 100 s on SmolLM2).
    hostile = {"type": "string", "pattern": "^((.{1,20}){1,20}){1,20}$"}
    with RunningServer(tiny_models["llama"], tmp_path, tmp_path / "cache") as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            long = {"inputs": "Hello", "parameters": {"max_new_tokens": 200, "ignore_eos_token": True}}
            constrained = {"inputs": "Hi", "parameters": {"max_new_tokens": 5, "response_format": {"type": "json_schema", "schema": hostile}}}
            gaps, last = [], None
            async with client.stream("POST", "/generate_stream", json=long) as stream:
                slow = asyncio.ensure_future(client.post("/generate", json=constrained))
                async for line in stream.aiter_lines():
                    if line.startswith("data:"):
                        now = time.monotonic()
                        if last is not None and not slow.done():
                            gaps.append(now - last)
                        last = now
                refused = await slow
            assert refused.status_code == 422 and "did not compile within 1.5s" in refused.json()["error"]
            assert gaps and max(gaps) < 1.0, f"the stream stalled {max(gaps):.1f}s while a schema compiled"
            for response_format in ({"type": "json_object"}, {"type": "json_schema", "schema": SCHEMA}):
                started = time.monotonic()
                answer = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3, "response_format": response_format}})
                assert answer.status_code == 200 and time.monotonic() - started < 1.5, answer.text  # no wait for the hostile one
            started = time.monotonic()
            again = await client.post("/generate", json=constrained)  # remembered: refused without a second compile
            assert again.status_code == 422 and "refused without trying again" in again.json()["error"] and time.monotonic() - started < 1


def test_a_grammar_that_costs_more_each_token_fails_alone_before_it_stalls_the_batch(tiny_models: dict[str, Path]) -> None:
    """This pattern compiles at once, then its mask costs more with every token (unbounded, 107 s for 40 tokens of this
    request, every step of its neighbour waiting): past its per-step budget it fails alone with a 422."""
    from lorafleet.server.api.errors import classify
    from lorafleet.server.engine.grammar_mask import GrammarTooCostly

    prompt, plain = [1, 5, 6], SamplingParams(max_new_tokens=40)
    alone = make_engine(tiny_models["llama"])
    reference = alone.add_request(prompt, plain)
    alone.run_to_completion()
    engine = make_engine(tiny_models["llama"])
    fmt = {"type": "json_schema", "schema": {"type": "string", "pattern": "^((.{1,60}){1,20}){1,20}$"}}
    costly = engine.add_request(prompt, SamplingParams(max_new_tokens=40, response_format=fmt, do_sample=True, temperature=50.0, seed=3))
    neighbour = engine.add_request(prompt, plain)
    engine.run_to_completion()
    assert costly.finish_reason is FinishReason.ERROR and isinstance(costly.error, GrammarTooCostly)
    assert len(costly.generated_ids) < 40  # stopped before the end, not after paying for every token
    status, error_type, message = classify(costly.error)
    assert (status, error_type) == (422, "validation") and "grammar" in message
    assert neighbour.generated_ids == reference.generated_ids  # the batch went on, unchanged
    again = SamplingParams(max_new_tokens=40, response_format=fmt)
    with pytest.raises(GrammarTooCostly, match="before"):  # remembered: refused at admission, before any step pays for it
        engine.add_request(prompt, again)
    with pytest.raises(GrammarTooCostly, match="before"):  # and by the HTTP layer's compile, before the engine sees it
        engine.grammar().compile_isolated(fmt, timeout=10.0)


class BurnsAtThird:
    """A matcher whose third mask burns ``cpu_s`` of CPU, as a pattern's mask does a few tokens into its ramp."""

    def __init__(self, real, cpu_s: float) -> None:  # noqa: ANN001
        self.real, self.cpu_s, self.calls = real, cpu_s, 0
        self.finished = threading.Event()

    def fill_next_token_bitmask(self, bitmask) -> None:  # noqa: ANN001
        self.calls += 1
        if self.calls == 3:
            started, data = time.thread_time(), bytes(1 << 20)
            while time.thread_time() - started < self.cpu_s:
                hashlib.sha256(data).digest()  # CPU without the GIL, as xgrammar's fill (a Python loop would slow the step)
            self.finished.set()
        self.real.fill_next_token_bitmask(bitmask)

    def accept_token(self, token_id: int) -> None:
        self.real.accept_token(token_id)


def test_a_mask_past_its_deadline_fails_its_row_without_stalling_the_step(tiny_models: dict[str, Path]) -> None:
    """xgrammar cannot be interrupted mid-mask: one that runs long (1.5 s of CPU here) is left to finish on its own
    thread; the step waits at most MASK_DEADLINE_S for it (it waited the whole 1.5 s, every other row with it), the
    row fails alone with a 422, and the grammar is refused from then on once its CPU time shows the cost was its own."""
    from lorafleet.server.engine.grammar_mask import MASK_DEADLINE_S, GrammarTooCostly

    prompt, plain = [1, 5, 6], SamplingParams(max_new_tokens=12, ignore_eos=True)
    alone = make_engine(tiny_models["llama"])
    reference = alone.add_request(prompt, plain)
    alone.run_to_completion()
    engine = make_engine(tiny_models["llama"])
    fmt = {"type": "json_schema", "schema": SCHEMA}
    costly = engine.add_request(prompt, SamplingParams(max_new_tokens=12, response_format=fmt))
    burner = costly.constraint.matcher = BurnsAtThird(costly.constraint.matcher, cpu_s=1.5)
    neighbour = engine.add_request(prompt, plain)
    longest = 0.0
    while engine.has_work():
        started = time.perf_counter()
        engine.step()
        longest = max(longest, time.perf_counter() - started)
    assert costly.finish_reason is FinishReason.ERROR and isinstance(costly.error, GrammarTooCostly)
    assert len(costly.generated_ids) == 2 and "over 100 ms" in str(costly.error)
    assert neighbour.generated_ids == reference.generated_ids
    assert longest < MASK_DEADLINE_S + 0.5  # was the whole 1.5 s
    assert burner.finished.wait(30)
    deadline = time.monotonic() + 5
    while True:  # remembered by the mask's own thread as it ends
        try:
            engine.add_request(prompt, SamplingParams(max_new_tokens=4, response_format=fmt))
        except GrammarTooCostly as exc:
            assert "before" in str(exc)
            break
        assert time.monotonic() < deadline, "the costly grammar was not remembered"
        time.sleep(0.05)


class GatedAtThird:
    """A matcher whose third mask is filled only once the test opens its gate (a slow mask, without the CPU)."""

    def __init__(self, real) -> None:  # noqa: ANN001
        self.real, self.calls, self.gate = real, 0, threading.Event()

    def fill_next_token_bitmask(self, bitmask) -> None:  # noqa: ANN001
        self.calls += 1
        if self.calls == 3:
            self.gate.wait(30)
        self.real.fill_next_token_bitmask(bitmask)

    def accept_token(self, token_id: int) -> None:
        self.real.accept_token(token_id)


def test_a_row_waiting_for_its_mask_is_parked_and_the_batch_goes_on(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """A mask within its deadline but slower than a step (a loaded machine, a long enum) held every row of the step
    until it was filled; now its row waits alone, and gets the very token it would have had."""
    from lorafleet.server.engine import grammar_mask

    monkeypatch.setattr(grammar_mask, "MASK_DEADLINE_S", 30.0)  # this mask is slow, not too costly: it must not fail
    prompt, plain = [1, 5, 6], SamplingParams(max_new_tokens=12, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=12, response_format={"type": "json_schema", "schema": SCHEMA}, do_sample=True, seed=11)
    alone = make_engine(tiny_models["llama"])
    reference_plain, reference_constrained = alone.add_request(prompt, plain), alone.add_request(prompt, constrained)
    alone.run_to_completion()
    engine = make_engine(tiny_models["llama"])
    slow = engine.add_request(prompt, constrained)
    gated = slow.constraint.matcher = GatedAtThird(slow.constraint.matcher)
    neighbour = engine.add_request(prompt, plain)
    while len(slow.generated_ids) < 2:
        engine.step()
    for _ in range(5):  # the slow row's third mask is filling: five steps go on without it, none waits for it
        started = time.perf_counter()
        engine.step()
        assert time.perf_counter() - started < 5.0
    assert len(slow.generated_ids) == 2 and engine.scheduler.parked == [slow]
    assert len(neighbour.generated_ids) >= 7
    gated.gate.set()
    engine.run_to_completion()
    assert slow.finish_reason is not FinishReason.ERROR, slow.error
    assert slow.generated_ids == reference_constrained.generated_ids
    assert neighbour.generated_ids == reference_plain.generated_ids
    assert not engine.scheduler.parked and engine.allocator.num_free == engine.allocator.num_blocks
