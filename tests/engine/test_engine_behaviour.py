"""Scheduling, cancellation, stopping, sampling and streaming text, as a user of the engine sees them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support.engine import make_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.server.engine import detokenizer
from lorafleet.server.engine.sequence import FinishReason, SamplingParams, Sequence

PROMPTS = [[1] + list(range(10 + 7 * i, 10 + 7 * i + 3 + 5 * i)) for i in range(6)]


def test_pool_exhaustion_preempts_and_every_request_still_finishes_right(tiny_models: dict[str, Path]) -> None:
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    ample = make_engine(tiny_models["llama"])
    expected = []
    for prompt in PROMPTS:
        seq = ample.add_request(prompt, params)
        ample.run_to_completion()
        expected.append(seq.generated_ids)
    # 16 blocks of 4 tokens: room for about two of these sequences at a time.
    block_bytes = 2 * 2 * 4 * 2 * 16 * 4
    tight = make_engine(tiny_models["llama"], kv_cache_memory=16 * block_bytes)
    assert tight.allocator.num_blocks == 16
    seqs = [tight.add_request(p, params) for p in PROMPTS]
    tight.run_to_completion()
    assert tight.scheduler.num_preemptions > 0
    assert [s.generated_ids for s in seqs] == expected
    assert all(s.finish_reason is FinishReason.LENGTH for s in seqs)
    assert tight.allocator.num_free == 16


def test_a_request_larger_than_the_pool_is_refused(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], kv_cache_memory=4 * 2 * 2 * 4 * 2 * 16 * 4)
    with pytest.raises(ValueError, match="needs 9 KV blocks; the whole pool has 4"):
        engine.add_request(list(range(1, 20)), SamplingParams(max_new_tokens=16))


def test_input_plus_new_tokens_over_the_limit_is_refused(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], max_total_tokens=32, max_input_length=16)
    with pytest.raises(ValueError, match="must be <= 32. Given: 10 `inputs` tokens and 30 `max_new_tokens`"):
        engine.add_request(list(range(1, 11)), SamplingParams(max_new_tokens=30))


def test_cancel_frees_blocks_at_the_next_step(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"])
    total = engine.allocator.num_free
    keep = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=50, ignore_eos=True))
    gone = engine.add_request(PROMPTS[3], SamplingParams(max_new_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    held_by_gone = len(gone.block_table)
    assert held_by_gone > 0
    free_before = engine.allocator.num_free
    engine.cancel(gone)
    outputs = engine.step()
    assert any(o.seq is gone and o.finished and o.token is None for o in outputs)
    assert gone.finish_reason is FinishReason.CANCELLED and gone.block_table == []
    assert engine.allocator.num_free >= free_before + held_by_gone - 1  # minus at most one block `keep` grew into
    engine.run_to_completion()
    assert len(keep.generated_ids) == 50 and engine.allocator.num_free == total


def test_stop_sequence_split_across_tokens(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"])
    probe = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=16, ignore_eos=True))
    engine.run_to_completion()
    tokenizer = engine.tokenizer
    pieces = [tokenizer.decode(probe.generated_ids[: i + 1]) for i in range(len(probe.generated_ids))]
    # A stop string that begins inside one token's text and ends inside a later one.
    i = next(i for i in range(2, 16) if len(pieces[i]) > len(pieces[i - 1]) and len(pieces[i - 1]) > len(pieces[i - 2]))
    stop = pieces[i][len(pieces[i - 2]) - 1 : len(pieces[i - 1]) + 1]
    assert len(stop) >= 3  # last char of one token, all of the next, first char of the one after
    engine = make_engine(tiny_models["llama"])
    seq = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=16, ignore_eos=True, stop=[stop]))
    engine.run_to_completion()
    assert seq.finish_reason is FinishReason.STOP
    assert seq.text.endswith(stop) and seq.text == pieces[-1][: pieces[-1].index(stop) + len(stop)]
    assert "".join(t.text for t in seq.tokens) == seq.text


def test_seeded_sampling_is_reproducible_inside_different_batches(tiny_models: dict[str, Path]) -> None:
    params = dict(max_new_tokens=16, do_sample=True, temperature=0.9, top_k=50, top_p=0.95, seed=1234, ignore_eos=True)
    engine = make_engine(tiny_models["llama"])
    alone = engine.add_request(PROMPTS[2], SamplingParams(**params))
    engine.run_to_completion()
    engine = make_engine(tiny_models["llama"])
    others = [engine.add_request(p, SamplingParams(max_new_tokens=20, do_sample=True, temperature=1.3, ignore_eos=True)) for p in PROMPTS[:2]]
    engine.step()
    crowded = engine.add_request(PROMPTS[2], SamplingParams(**params))
    engine.run_to_completion()
    assert crowded.generated_ids == alone.generated_ids
    assert crowded.seed_used == 1234
    assert all(o.seed_used is not None for o in others)
    engine = make_engine(tiny_models["llama"])
    other_seed = engine.add_request(PROMPTS[2], SamplingParams(**{**params, "seed": 99}))
    engine.run_to_completion()
    assert other_seed.generated_ids != alone.generated_ids


@pytest.mark.parametrize(
    "params",
    [
        dict(do_sample=True, typical_p=0.5),
        dict(do_sample=True, top_p=0.3),
        dict(do_sample=True, top_k=1),
        dict(temperature=0.0, repetition_penalty=1.5),
        dict(frequency_penalty=1.5, presence_penalty=0.5),
    ],
)
def test_warpers_and_penalties_produce_valid_tokens(tiny_models: dict[str, Path], params: dict) -> None:
    engine = make_engine(tiny_models["llama"])
    seq = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=10, ignore_eos=True, seed=5, **params))
    engine.run_to_completion()
    assert len(seq.generated_ids) == 10
    assert all(0 <= t < engine.runner.model_config.vocab_size for t in seq.generated_ids)
    if params.get("top_k") == 1:  # top-1 sampling is greedy
        greedy = make_engine(tiny_models["llama"])
        g = greedy.add_request(PROMPTS[1], SamplingParams(max_new_tokens=10, ignore_eos=True))
        greedy.run_to_completion()
        assert seq.generated_ids == g.generated_ids


def test_repetition_penalty_matches_transformers(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"])
    seq = engine.add_request(PROMPTS[2], SamplingParams(max_new_tokens=12, repetition_penalty=1.8, ignore_eos=True))
    engine.run_to_completion()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ids = torch.tensor([PROMPTS[2]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False, repetition_penalty=1.8, eos_token_id=[], pad_token_id=0)
    assert seq.generated_ids == out[0, ids.shape[1]:].tolist()


def test_logprobs_alternatives_and_prefill_details(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["llama"], max_batch_prefill_tokens=5)  # the prompt's logprobs span chunks
    prompt = PROMPTS[3]
    seq = engine.add_request(prompt, SamplingParams(max_new_tokens=4, ignore_eos=True, alternatives=3, prefill_logprobs=True))
    engine.run_to_completion()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    ref = model(torch.tensor([prompt + seq.generated_ids])).logits[0].log_softmax(-1)
    assert [p.id for p in seq.prefill] == prompt and seq.prefill[0].logprob is None
    for i, info in enumerate(seq.prefill[1:], start=1):
        assert info.logprob == pytest.approx(float(ref[i - 1, prompt[i]]), abs=1e-4)
    for j, token in enumerate(seq.tokens):
        row = ref[len(prompt) - 1 + j]
        assert token.logprob == pytest.approx(float(row[token.id]), abs=1e-4)
        assert [a.id for a in token.alternatives] == row.topk(3).indices.tolist()
        assert token.alternatives[0].id == token.id  # greedy picks the top alternative


def test_utf8_characters_are_streamed_whole(tiny_models: dict[str, Path]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = "Grüße 🙂🚀 日本語 ok"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # the tokens really split characters
    seq = Sequence([1], SamplingParams())
    deltas = []
    for token in ids:
        seq.token_ids.append(token)
        deltas.append(detokenizer.next_text(tokenizer, seq))
    deltas.append(detokenizer.flush_text(tokenizer, seq))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text


def test_streamed_token_texts_add_up_to_the_generated_text(tiny_models: dict[str, Path]) -> None:
    engine = make_engine(tiny_models["qwen2"])
    seqs = [engine.add_request(p, SamplingParams(max_new_tokens=30, do_sample=True, seed=i, ignore_eos=True)) for i, p in enumerate(PROMPTS)]
    engine.run_to_completion()
    for seq in seqs:
        assert "".join(t.text for t in seq.tokens) == seq.text == engine.tokenizer.decode(seq.generated_ids, skip_special_tokens=True)


def test_eos_ends_generation_unless_ignored(tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    engine = make_engine(tiny_models["llama"])
    eos = engine.tokenizer.eos_token_id
    engine.output.eos_ids = {eos}
    import lorafleet.server.engine.output as output_module

    monkeypatch.setattr(output_module, "sample", lambda logits, seqs: ([eos] * len(seqs), logits.log_softmax(-1), {}))
    stops = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5))
    runs_on = engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=5, ignore_eos=True))
    engine.run_to_completion()
    assert stops.finish_reason is FinishReason.EOS and stops.generated_ids == [eos] and stops.tokens[0].special
    assert runs_on.finish_reason is FinishReason.LENGTH and runs_on.generated_ids == [eos] * 5
