"""Prompt-lookup speculative decoding is exact: the same tokens (greedy) and the same draws (seeded sampling) as one
token per step, for base rows and a batch of many adapters, with chunked prefill, preemption and prefix caching on.

Every parity test also asserts that proposals were both accepted and rejected: a verification that accepted every
proposal (or none) would fail it. What a proposal costs is measured from step times, which differ from run to run;
the parity tests pin that cost at nothing (``rows_are_free``), so they propose the same tokens on every run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.server.engine.engine import LLMEngine
from lorafleet.server.engine.sequence import SamplingParams, Sequence
from lorafleet.server.engine.speculation import NgramSpeculator, StepCost, propose
from lorafleet.testing import ALL_PROJECTIONS, make_lora_adapter

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

# Prompts that repeat themselves (what prompt lookup is for) and one that does not; the tiny random models' greedy
# output falls into loops, which the lookup proposes from and the model sometimes leaves.
PROMPTS = [[1] + list(range(30, 50)) * 3, [1, 5, 6, 7, 8, 9, 10] * 4, [1, 20, 21], [1] + [7, 8] * 10, [1] + list(range(60, 90))]
GREEDY = SamplingParams(max_new_tokens=40, ignore_eos=True)


@pytest.fixture(autouse=True)
def rows_are_free(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    if "as_many_tokens_as_pay" not in request.node.name:
        monkeypatch.setattr(StepCost, "per_row_share", lambda self, rows: 0.0)


def serve(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams], adapters: list[str | None] | None = None,
          stagger: bool = True) -> list[Sequence]:
    """One arrival per step when ``stagger``, so verify chunks share steps with prefill chunks and decode rows."""
    adapters = adapters or [None] * len(prompts)
    seqs, pending = [], list(zip(prompts, params, adapters))
    while pending or engine.has_work():
        for _ in range(1 if stagger else len(pending)):
            if pending:
                prompt, p, adapter = pending.pop(0)
                seqs.append(engine.add_request(prompt, p, adapter))
        engine.step()
    return seqs


def both(folder: Path, prompts: list[list[int]], params: list[SamplingParams], adapters: dict[str, Path] | None = None,
         rows: list[str | None] | None = None, **settings) -> tuple[list[Sequence], list[Sequence], LLMEngine]:
    """The same requests with speculation off and on: (off, on, the speculating engine)."""
    results = []
    for mode in ("off", "ngram"):
        engine = make_engine(folder, speculative=mode, **settings)
        for name, adapter_folder in (adapters or {}).items():
            engine.load_adapter(name, adapter_folder)
        results.append(serve(engine, prompts, params, rows))
        assert engine.allocator.num_free == engine.allocator.num_blocks  # every block back in the pool (cached ones too)
    return results[0], results[1], engine


def assert_proposals_were_judged(engine: LLMEngine) -> None:
    spec = engine.speculator
    assert spec is not None and 0 < spec.num_accepted_tokens < spec.num_draft_tokens, (spec.num_accepted_tokens, spec.num_draft_tokens)


def test_propose_continues_the_most_recent_earlier_occurrence_of_the_longest_suffix() -> None:
    assert propose([5, 1, 2, 3, 9, 8, 4, 2, 3, 7, 1, 2, 3], 3, 2) == [9, 8]  # [1, 2, 3] occurred; [2, 3] later too
    assert propose([5, 1, 2, 3, 9, 8, 4, 2, 3, 7, 6, 2, 3], 3, 2) == [7, 6]  # only [2, 3]: its most recent occurrence
    assert propose([4, 4, 4], 3, 5) == [4]  # [4, 4] at 0: what followed is the last token itself
    assert propose([1, 2, 3], 3, 4) == []
    assert propose([1, 2, 1], 3, 0) == []
    # 256 then 0 is, in little-endian int32 bytes, 00 01 00 00 00 ..: the bytes of token 1 start at byte 1, not a token
    assert propose([256, 0, 7, 1], 1, 2) == []


def test_a_request_proposes_as_many_tokens_as_pay_and_waits_when_none_do() -> None:
    spec = NgramSpeculator(max_tokens=4, max_ngram=2)
    seq = Sequence([1, 2, 3, 1, 2], SamplingParams(max_new_tokens=50))
    assert spec.draft(seq) == [3, 1, 2]  # rows cost nothing measured yet: the most there is, up to 4
    for rows, seconds in [(4, 0.05), (8, 0.07), (4, 0.05), (8, 0.07), (6, 0.06)] * 4:  # a = 0.03 s, b = 0.005 s a row
        spec.cost.observe(rows, seconds)
    spec.begin_step(running=4)
    assert spec.threshold == pytest.approx(1.25 * 0.02 / 0.05)  # one more row costs 0.4 of a token's time at 4 running, with a margin
    spec.begin_step(running=6)
    assert spec.tokens_that_pay(seq) == 0  # no record yet: a one-half chance does not beat 1.25 * 0.5
    spec.begin_step(running=2)
    assert spec.tokens_that_pay(seq) == 1  # at 2 running a row costs 0.25 of a token (0.31 with the margin): 0.5 pays once, 0.25 does not
    spec.begin_step(running=4)
    spec.verified(seq, 3, 3)
    spec.verified(seq, 4, 4)
    assert spec.tokens_that_pay(seq) == 4
    for _ in range(8):  # its record decays by 0.8 a verification: a run of misses outweighs older hits
        spec.verified(seq, 1, 0)
    assert spec.tokens_that_pay(seq) == 0
    assert [spec.draft(seq) for _ in range(5)] == [[], [], [], [], [3]]  # none pays: it waits four steps, then probes with one
    assert seq.draft_backoff == 8  # the next wait, unless the probe is accepted
    spec.verified(seq, 1, 1)
    assert seq.draft_backoff == 4
    spec.begin_step(running=1)  # alone, a row costs 0.14 of a token: small chances pay
    assert spec.tokens_that_pay(seq) >= 1
    seq.params.speculative = False
    assert spec.draft(seq) == []
    short = Sequence([1, 2, 3, 1, 2], SamplingParams(max_new_tokens=2))
    assert spec.draft(short) == [3]  # the limit leaves room for one proposal and the token after it
    assert propose([1, 2, 3, 9, 2, 7, 3], 3, 2, min_ngram=2) == []  # only a one-token match: not proposed
    assert propose([1, 2, 3, 9, 2, 7, 3], 3, 2) == [9, 2]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_with_speculation_is_token_for_token_greedy_without(tiny_models: dict[str, Path], tmp_path: Path, arch: str) -> None:
    """Chunked prefill (16 tokens a step) and prefix caching on; mistral's window shorter than the sequences, so it acts."""
    folder = tiny_models[arch]
    if arch == "mistral":
        from lorafleet.testing import make_tiny_model

        folder = make_tiny_model(tmp_path / "windowed", arch="mistral", seed=1, sliding_window=24)
    off, on, engine = both(folder, PROMPTS, [GREEDY] * len(PROMPTS), max_batch_prefill_tokens=16)
    assert [s.generated_ids for s in on] == [s.generated_ids for s in off]
    assert_proposals_were_judged(engine)
    for a, b in zip(off, on):
        assert [t.logprob for t in b.tokens] == pytest.approx([t.logprob for t in a.tokens], abs=1e-4)
        assert b.text == a.text and b.finish_reason == a.finish_reason


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_a_batch_of_many_adapters_verifies_each_row_under_its_own_adapter(tiny_models: dict[str, Path], tmp_path: Path, kernel: str) -> None:
    """On the torch path, and on the Triton attention and LoRA kernels (interpreted here) through the CUDA-graph
    path's padded static buffers (what cuda replays; eager on CPU): a verify chunk is 1 + k decode rows."""
    base = tiny_models["llama"]
    adapters = {
        "a0": make_lora_adapter(base, tmp_path / "a0", r=4, seed=1),
        "a1": make_lora_adapter(base, tmp_path / "a1", r=8, target_modules=ALL_PROJECTIONS, seed=2),
        "a2": make_lora_adapter(base, tmp_path / "a2", r=16, target_modules=["o_proj", "down_proj"], seed=3),
    }
    rows = [None, "a0", "a1", "a2", "a0"]
    prompts, params = PROMPTS, [GREEDY] * len(PROMPTS)
    if kernel == "triton":  # the interpreter runs a kernel per layer per step in Python: a smaller batch (about 25 s)
        picked = [1, 3, 4]  # three requests whose proposals are sometimes rejected within 16 tokens
        prompts, rows, params = [PROMPTS[i] for i in picked], [rows[i] for i in picked], [SamplingParams(max_new_tokens=16, ignore_eos=True)] * 3
    graphs = "on" if kernel == "triton" else "off"
    off, on, engine = both(base, prompts, params, adapters, rows, max_batch_prefill_tokens=16, attention_kernel=kernel, lora_kernel=kernel,
                           cuda_graphs=graphs)
    if kernel == "triton":
        assert engine.runner.decode_graphs.replays > 0
    assert [s.generated_ids for s in on] == [s.generated_ids for s in off]
    assert_proposals_were_judged(engine)
    # the adapters matter here: the same prompt under another adapter answers differently


def test_preempted_sequences_recompute_and_still_match(tiny_models: dict[str, Path]) -> None:
    """A pool of 40 blocks of 4 tokens cannot hold the five requests (up to 26 blocks each) at once: the newest are
    preempted, and proposals take only blocks that are free."""
    probe = make_engine(tiny_models["llama"])
    per_block = probe.runner.kv_cache_bytes // probe.runner.num_blocks
    results, preemptions = [], []
    for mode in ("off", "ngram"):
        engine = make_engine(tiny_models["llama"], speculative=mode, kv_cache_memory=40 * per_block)
        seqs = serve(engine, PROMPTS, [GREEDY] * len(PROMPTS), stagger=False)
        preemptions.append(engine.scheduler.num_preemptions)
        assert engine.allocator.num_free == 40
        results.append([s.generated_ids for s in seqs])
    assert results[1] == results[0]
    assert 0 < preemptions[1] <= preemptions[0], preemptions
    assert_proposals_were_judged(engine)


def test_seeded_sampling_draws_the_same_tokens_and_stops_the_same_way(tiny_models: dict[str, Path]) -> None:
    """Sampling with penalties, top-p and a seed: the verifier draws one value per emitted token, as plain decoding
    does, so the draws are identical; stop strings and the length limit end the requests at the same token."""
    params = [
        SamplingParams(max_new_tokens=40, do_sample=True, temperature=0.7, seed=11, ignore_eos=True),
        SamplingParams(max_new_tokens=40, do_sample=True, top_p=0.9, repetition_penalty=1.2, seed=12, ignore_eos=True),
        SamplingParams(max_new_tokens=40, ignore_eos=True, frequency_penalty=0.5, presence_penalty=0.3),
        SamplingParams(max_new_tokens=7, ignore_eos=True, alternatives=2),
        SamplingParams(max_new_tokens=40, ignore_eos=True, stop=["<never>"]),
    ]
    off, on, engine = both(tiny_models["llama"], PROMPTS, params)
    for a, b in zip(off, on):
        assert b.generated_ids == a.generated_ids
        assert (b.text, b.finish_reason) == (a.text, a.finish_reason)
        assert [[x.id for x in t.alternatives] for t in b.tokens] == [[x.id for x in t.alternatives] for t in a.tokens]
    assert len(on[3].generated_ids) == 7
    assert engine.speculator.num_draft_tokens > 0


def test_a_stop_string_inside_accepted_proposals_ends_the_request_there(tiny_models: dict[str, Path]) -> None:
    greedy = make_engine(tiny_models["llama"])
    [seq] = serve(greedy, [PROMPTS[3]], [GREEDY])
    stop = greedy.tokenizer.decode(seq.generated_ids[10:12])  # text the loop emits; proposals cover it
    params = SamplingParams(max_new_tokens=40, ignore_eos=True, stop=[stop])
    off, on, engine = both(tiny_models["llama"], [PROMPTS[3]], [params])
    assert on[0].finish_reason == off[0].finish_reason and on[0].text == off[0].text and on[0].generated_ids == off[0].generated_ids
    assert engine.speculator.num_accepted_tokens > 0


def test_requests_can_turn_it_off_and_blocks_of_rejected_proposals_are_released(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], speculative="ngram", prefix_caching=False)
    quiet = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=40, ignore_eos=True, speculative=False))
    loud = engine.add_request(PROMPTS[3], GREEDY)
    bs = engine.config.block_size
    while engine.has_work():
        engine.step()
        for seq in engine.scheduler.running:  # between steps a table holds its tokens, never a rejected proposal's block
            assert len(seq.block_table) <= -(-len(seq.token_ids) // bs)
    assert quiet.num_draft_tokens == 0 and loud.num_draft_tokens > 0
    assert quiet.generated_ids == loud.generated_ids
    assert engine.allocator.num_free == engine.allocator.num_blocks


def test_the_replica_speculates_per_request_streams_every_token_and_counts_acceptance(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    import httpx
    from support.metrics import metric_values
    from support.server import RunningServer

    prompt = "one two three four five six seven eight " * 4
    with RunningServer(tiny_models["llama"], tmp_path, tmp_path / "cache", engine={"speculative": "ngram"}) as server:
        assert httpx.get(server.url + "/info").json()["speculative"] == "ngram"
        answers = {}
        for speculative in (True, False):
            body = {"inputs": prompt, "parameters": {"max_new_tokens": 30, "speculative": speculative, "details": True}}
            answers[speculative] = httpx.post(server.url + "/generate", json=body, timeout=60).json()
        streamed = []
        with httpx.stream("POST", server.url + "/generate_stream", json={"inputs": prompt, "parameters": {"max_new_tokens": 30}}, timeout=60) as response:
            for line in response.iter_lines():
                if line.startswith("data:"):
                    streamed.append(line)
        bad = httpx.post(server.url + "/generate", json={"inputs": prompt, "parameters": {"speculative": "yes"}}, timeout=30)
        values = metric_values(httpx.get(server.url + "/metrics").text)
    assert answers[True]["generated_text"] == answers[False]["generated_text"]
    assert answers[True]["details"]["generated_tokens"] == 30 and len(streamed) == 30  # one event per token, however many a step made
    assert bad.status_code == 422 and "`speculative` must be true or false" in bad.json()["error"]
    assert 0 < values["vllm:spec_decode_num_accepted_tokens_total"] <= values["vllm:spec_decode_num_draft_tokens_total"]


@pytest.mark.parametrize("sampling", [dict(), dict(do_sample=True, temperature=1.5, seed=7)], ids=["greedy", "sampled"])
def test_a_grammar_judges_every_position_as_it_would_one_token_at_a_time(tiny_models: dict[str, Path], sampling: dict) -> None:
    """A schema-constrained request proposes tokens its grammar may forbid: each position is masked by the grammar as it
    stands after the tokens before it, so the output is the one without speculation (and valid)."""
    import json

    schema = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "tags": {"type": "array", "items": {"enum": ["a", "b"]}}},
              "required": ["color", "tags"], "additionalProperties": False}
    params = [SamplingParams(max_new_tokens=60, response_format={"type": "json_schema", "schema": schema}, **sampling)] * 3 + [GREEDY]
    off, on, engine = both(tiny_models["llama"], [PROMPTS[0], PROMPTS[3], [1, 5, 6], PROMPTS[1]], params)
    for a, b in zip(off, on):
        assert (b.generated_ids, b.text, b.finish_reason) == (a.generated_ids, a.text, a.finish_reason)
    for seq in on[:3]:
        if seq.finish_reason.value == "eos_token":
            assert set(json.loads(seq.text)) == {"color", "tags"}
    assert engine.speculator.num_draft_tokens > 0
