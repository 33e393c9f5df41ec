"""Prefix caching: shared prompt prefixes reuse KV blocks per adapter, and the tokens never change for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.engine import capture_logits, make_engine

from lorafleet.server.engine.blocks import BlockAllocator, block_hash
from lorafleet.server.engine.sequence import SamplingParams
from lorafleet.server.lora.adapter_format import content_fingerprint
from lorafleet.testing import make_lora_adapter, make_tiny_model

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)
SYSTEM = [1] + [(13 * j) % 280 + 11 for j in range(37)]  # a shared 38-token "system prompt": 9 full blocks of 4, and 2 more
TURNS = [[(5 * i + j) % 290 + 7 for j in range(3 + i % 5 * 2)] for i in range(8)]  # distinct from their first token on
BLOCK_BYTES = 2 * 2 * 4 * 2 * 16 * 4  # the tiny models' KV block (2 layers, 2 KV heads of 16, 4 tokens, K and V, fp32)


def h(n: int) -> bytes:
    return block_hash(b"", b"", [n] * 4)


def test_the_allocator_shares_counts_and_evicts_cached_blocks_last() -> None:
    allocator = BlockAllocator(4, 4, caching=True)
    first: list[int] = []
    allocator.grow(first, 8)
    allocator.register(first[0], h(0))
    allocator.register(first[1], h(1))
    shared = allocator.take_cached([h(0), h(1), h(2)])  # the run stops at the first miss
    blocks = list(shared)
    assert shared == first and allocator.num_free == 2
    allocator.free(first)
    assert allocator.num_free == 2  # still referenced by the second table
    allocator.free(shared)
    assert allocator.num_free == 4 and allocator.num_cached == 2  # freed, still findable
    fresh: list[int] = []
    allocator.grow(fresh, 8)  # two blocks needed: the never-cached ones go first
    assert not set(fresh) & set(blocks) and allocator.num_cached == 2
    allocator.grow(fresh, 12)  # a third: the least recently freed cached block (the chain's tail, h(1)) is evicted
    assert allocator.num_cached == 1 and allocator.take_cached([h(0)]) == [blocks[0]]
    assert allocator.take_cached([h(1)]) == []


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    root = tmp_path_factory.mktemp("prefix-adapters")
    return {arch: {name: make_lora_adapter(tiny_models[arch], root / arch / name, r=8, seed=i, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
                   for i, name in enumerate(("a", "b"))} for arch in ("llama", "mistral", "qwen2")}


def run_conversations(engine, adapters: dict[str, Path], rows: list[str | None], arrive_every: int = 3) -> list[list[int]]:  # noqa: ANN001
    """Requests sharing SYSTEM, arriving a few steps apart (so later ones find the earlier ones' blocks)."""
    for name, folder in adapters.items():
        engine.load_adapter(name, folder)
    pending = [(SYSTEM + TURNS[i % len(TURNS)], adapter) for i, adapter in enumerate(rows)]
    seqs = []
    while pending or engine.has_work():
        if pending:
            prompt, adapter = pending.pop(0)
            seqs.append(engine.add_request(prompt, GREEDY, adapter=adapter))
        for _ in range(arrive_every):
            engine.step()
    return [s.generated_ids for s in seqs]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_greedy_tokens_and_logits_equal_with_caching_on_and_off(arch: str, tiny_models, adapters, monkeypatch) -> None:  # noqa: ANN001
    rows = [None, "a", None, "b", "a", None, "b", "a"]
    captured = capture_logits(monkeypatch)
    off = make_engine(tiny_models[arch], prefix_caching=False, max_active_adapters=4, max_lora_rank=16)
    expected = run_conversations(off, adapters[arch], rows)
    off_logits = [torch.stack(captured[k]) for k in sorted(captured, key=lambda k: int(k.split("-")[1]))]
    captured.clear()
    on = make_engine(tiny_models[arch], max_active_adapters=4, max_lora_rank=16)
    assert run_conversations(on, adapters[arch], rows) == expected
    on_logits = [torch.stack(captured[k]) for k in sorted(captured, key=lambda k: int(k.split("-")[1]))]
    for ours, theirs in zip(on_logits, off_logits):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    # Each of base, a and b computed the shared 9 blocks once; every later request of the same kind found them.
    assert on.prefix.hit_tokens == 9 * 4 * (len(rows) - 3) and off.prefix is None
    assert on.prefix.queried_tokens == sum(len(SYSTEM + TURNS[i % len(TURNS)]) for i in range(len(rows)))


def test_forced_preemption_keeps_the_tokens(tiny_models, adapters) -> None:  # noqa: ANN001
    """A pool of 24 blocks cannot hold the batch: sequences are preempted and readmitted through the cache."""
    rows = [None, "a", "b", None, "a", "b"]
    expected = run_conversations(make_engine(tiny_models["llama"], prefix_caching=False, max_active_adapters=4, max_lora_rank=16), adapters["llama"], rows, 1)
    tight = make_engine(tiny_models["llama"], kv_cache_memory=24 * BLOCK_BYTES, max_active_adapters=4, max_lora_rank=16)
    assert run_conversations(tight, adapters["llama"], rows, 1) == expected
    assert tight.scheduler.num_preemptions > 0 and tight.prefix.hit_tokens > 0
    assert tight.allocator.num_free == 24  # every reference returned


def test_two_adapters_never_share_a_block_even_for_the_same_prompt(tiny_models, adapters) -> None:  # noqa: ANN001
    engine = make_engine(tiny_models["llama"], max_active_adapters=4, max_lora_rank=16)
    for name, folder in adapters["llama"].items():
        engine.load_adapter(name, folder)
    prompt = SYSTEM + TURNS[0]
    first = engine.add_request(prompt, GREEDY, adapter="a")
    engine.run_to_completion()
    cached_for_a = engine.allocator.num_cached
    blocks_of_a = set(engine.allocator._cached.values())  # noqa: SLF001 - which blocks hold a's prefix
    for adapter in ("b", None):  # the same tokens under another adapter, and under the base model
        seq = engine.add_request(prompt, GREEDY, adapter=adapter)
        engine.step()
        assert seq.num_cached_tokens == 0 and not set(seq.block_table) & blocks_of_a
        engine.run_to_completion()
    again = engine.add_request(prompt, GREEDY, adapter="a")
    engine.step()
    assert again.num_cached_tokens == (len(prompt) - 1) // 4 * 4  # a's own blocks are found again, all but the last token
    engine.run_to_completion()
    assert again.generated_ids == first.generated_ids and engine.allocator.num_cached == 3 * cached_for_a


def test_an_adapters_content_is_part_of_the_key(tiny_models, tmp_path) -> None:  # noqa: ANN001
    """The same name with other weights (a re-uploaded folder) computes its own blocks."""
    engine = make_engine(tiny_models["llama"], max_active_adapters=4, max_lora_rank=16)
    one = engine.load_adapter("x", make_lora_adapter(tiny_models["llama"], tmp_path / "one", r=8, seed=1))
    first = engine.add_request(SYSTEM, GREEDY, adapter="x")
    engine.run_to_completion()
    engine.adapters.unload("x", set())
    two = engine.load_adapter("x", make_lora_adapter(tiny_models["llama"], tmp_path / "two", r=8, seed=2))
    assert one.fingerprint != two.fingerprint and content_fingerprint(two.weights) == two.fingerprint
    second = engine.add_request(SYSTEM, GREEDY, adapter="x")
    engine.step()
    assert second.num_cached_tokens == 0
    engine.run_to_completion()
    fresh = make_engine(tiny_models["llama"], prefix_caching=False, max_active_adapters=4, max_lora_rank=16)
    fresh.load_adapter("x", tmp_path / "two")
    expected = fresh.add_request(SYSTEM, GREEDY, adapter="x")
    fresh.run_to_completion()
    assert second.generated_ids == expected.generated_ids != first.generated_ids


def test_prompt_logprobs_requests_compute_every_token(tiny_models) -> None:  # noqa: ANN001
    engine = make_engine(tiny_models["llama"])
    engine.add_request(SYSTEM + [5, 6], GREEDY)
    engine.run_to_completion()
    detailed = engine.add_request(SYSTEM + [5, 6], SamplingParams(max_new_tokens=2, prefill_logprobs=True))
    engine.run_to_completion()
    assert detailed.num_cached_tokens == 0 and len(detailed.prefill) == len(SYSTEM) + 2


def test_a_sliding_window_that_acts_keeps_the_tokens(tmp_path) -> None:  # noqa: ANN001
    folder = make_tiny_model(tmp_path / "m", arch="mistral", sliding_window=6)
    results = []
    for caching in (False, True):
        engine = make_engine(folder, prefix_caching=caching, max_batch_prefill_tokens=8)
        results.append(run_conversations(engine, {}, [None] * 4))
    assert results[0] == results[1] and engine.prefix.hit_tokens == 9 * 4 * 3


def test_smollm2_conversations_equal_with_caching_on_and_off(smollm2_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    system = tokenizer.apply_chat_template([{"role": "system", "content": "You are a terse assistant for a bicycle shop. " * 6}], tokenize=True, return_dict=False)
    questions = ["What is a derailleur?", "How often should I oil my chain?", "What tyre pressure for a road bike?"]
    outputs = []
    for caching in (False, True):
        engine = make_engine(smollm2_path, prefix_caching=caching, block_size=16, kv_cache_memory=64 << 20, max_total_tokens=1024, max_input_length=512)
        seqs = []
        for question in questions:
            turn = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=True, return_dict=False, add_generation_prompt=True)
            seqs.append(engine.add_request(system + turn, SamplingParams(max_new_tokens=12)))
            engine.step()
        engine.run_to_completion()
        outputs.append([s.generated_ids for s in seqs])
    assert outputs[0] == outputs[1] and engine.prefix.hit_tokens >= 2 * (len(system) // 16) * 16


def test_the_replica_reports_caching_and_its_hits(tiny_models, tmp_path) -> None:  # noqa: ANN001
    import httpx
    from support.metrics import metric_values
    from support.server import RunningServer

    from lorafleet.cli import build_parser

    with RunningServer(tiny_models["llama"], tmp_path, tmp_path / "cache") as server:
        assert httpx.get(server.url + "/info").json()["prefix_caching"] is True
        prompt = "the shared system prompt, long enough to fill several blocks of four tokens " * 2
        for question in ("one?", "two?"):
            assert httpx.post(server.url + "/generate", json={"inputs": prompt + question, "parameters": {"max_new_tokens": 2}}, timeout=30).status_code == 200
        values = metric_values(httpx.get(server.url + "/metrics").text)
    assert values["vllm:prefix_cache_queries_total"] >= 2 * 20 and values["vllm:prefix_cache_hits_total"] >= 16
    assert build_parser().parse_args(["serve", "--no-prefix-caching"]).prefix_caching is False
    assert build_parser().parse_args(["serve"]).prefix_caching is True
