"""The default model, SmolLM2-135M-Instruct, token for token against transformers' generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from lorafleet.server.config import EngineConfig
from lorafleet.server.engine.engine import LLMEngine
from lorafleet.server.engine.sequence import SamplingParams

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain what a LoRA adapter is in one sentence.",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
]
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts_and_reference(smollm2_path: Path) -> tuple[list[list[int]], list[list[int]]]:
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32)
    prompts, expected = [], []
    for question in QUESTIONS:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False)
        ids = list(ids["input_ids"] if isinstance(ids, dict) else ids)
        tensor = torch.tensor([ids])
        out = model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=[], pad_token_id=0)
        prompts.append(ids)
        expected.append(out[0, len(ids):].tolist())
    return prompts, expected


@pytest.fixture(scope="module")
def engine(smollm2_path: Path) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(smollm2_path), dtype="float32", kv_cache_memory=256 << 20))


def test_each_prompt_alone_matches_generate(engine: LLMEngine, prompts_and_reference) -> None:
    prompts, expected = prompts_and_reference
    for prompt, tokens in zip(prompts, expected):
        seq = engine.add_request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))
        engine.run_to_completion()
        assert seq.generated_ids == tokens


def test_staggered_batch_matches_generate(engine: LLMEngine, prompts_and_reference) -> None:
    prompts, expected = prompts_and_reference
    seqs = []
    for prompt in prompts:  # each joins a batch already decoding, three steps after the last
        seqs.append(engine.add_request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)))
        for _ in range(3):
            engine.step()
    engine.run_to_completion()
    assert [s.generated_ids for s in seqs] == expected
    assert "Paris" in seqs[0].text


def test_speculative_decoding_matches_generate(smollm2_path: Path, prompts_and_reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompt lookup on the real model: the staggered batch, token for token, some proposals accepted and some not
    (rows cost nothing here, so the proposals do not depend on this run's step times)."""
    from lorafleet.server.engine.speculation import StepCost

    monkeypatch.setattr(StepCost, "per_row_share", lambda self, rows: 0.0)
    prompts, expected = prompts_and_reference
    engine = LLMEngine(EngineConfig(model=str(smollm2_path), dtype="float32", kv_cache_memory=256 << 20, speculative="ngram"))
    seqs = []
    for prompt in prompts:
        seqs.append(engine.add_request(prompt, SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)))
        for _ in range(3):
            engine.step()
    engine.run_to_completion()
    assert [s.generated_ids for s in seqs] == expected
    spec = engine.speculator
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens, (spec.num_accepted_tokens, spec.num_draft_tokens)
