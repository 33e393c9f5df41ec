"""Each sampling parameter's effect on the distribution itself, against transformers' own logits processors.

Checking only that sampled tokens are valid passes with a parameter switched off; here the scores each rule
produces are compared value by value with the reference rule (transformers' processors where it has one, the
OpenAI formula for frequency and presence penalties), then draws are checked to follow those scores.
"""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from lorafleet.server.engine import sampler
from lorafleet.server.engine.sequence import SamplingParams, Sequence

VOCAB = 50
PROMPT = [3, 7, 7, 11]
GENERATED = [7, 20, 20, 20, 4]


def _logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def _seq(**params) -> Sequence:
    seq = Sequence(list(PROMPT), SamplingParams(**params))
    seq.token_ids.extend(GENERATED)
    return seq


def _ours(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    scores = logits.clone()
    sampler._row_scores(scores, seq)
    return sampler._warp(scores, seq)


def _reference(logits: torch.Tensor, *processors) -> torch.Tensor:
    ids = torch.tensor([PROMPT + GENERATED])
    scores = logits.clone()[None]
    for processor in processors:
        scores = processor(ids, scores)
    return scores[0]


@pytest.mark.parametrize(
    "params,processors",
    [
        (dict(repetition_penalty=1.8, temperature=0.0), [RepetitionPenaltyLogitsProcessor(1.8)]),
        (dict(temperature=0.5), [TemperatureLogitsWarper(0.5)]),
        (dict(temperature=1.7), [TemperatureLogitsWarper(1.7)]),
        (dict(do_sample=True, top_k=5), [TopKLogitsWarper(5)]),
        (dict(do_sample=True, top_p=0.6), [TopPLogitsWarper(0.6)]),
        (dict(do_sample=True, typical_p=0.4), [TypicalLogitsWarper(0.4)]),
        # transformers' order: repetition penalty, temperature, then the cuts.
        (dict(repetition_penalty=1.3, temperature=0.7, top_k=20, top_p=0.8),
         [RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)]),
    ],
    ids=["repetition", "temperature-0.5", "temperature-1.7", "top_k", "top_p", "typical_p", "all-in-order"],
)
def test_each_rule_matches_transformers_processors(params: dict, processors: list) -> None:
    for seed in range(3):
        logits = _logits(seed)
        ours, theirs = _ours(logits, _seq(**params)), _reference(logits, *processors)
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), "a different set of tokens was cut"
        kept = ~torch.isinf(theirs)
        torch.testing.assert_close(ours[kept], theirs[kept], atol=1e-5, rtol=1e-5)
        assert not torch.equal(ours, logits), "the rule changed nothing: the test would pass with it switched off"


def test_frequency_and_presence_penalties_follow_openai() -> None:
    """scores[t] -= frequency x count(t in generated) + presence x [t generated]; the prompt does not count."""
    logits = _logits()
    ours = _ours(logits, _seq(frequency_penalty=0.7, presence_penalty=0.4))
    expected = logits.clone()
    for token, count in {7: 1, 20: 3, 4: 1}.items():
        expected[token] -= 0.7 * count + 0.4
    torch.testing.assert_close(ours, expected)
    assert ours[3] == logits[3] and ours[11] == logits[11]  # prompt-only tokens untouched


def test_draws_follow_the_processed_distribution_and_repeat_by_seed() -> None:
    """2,000 seeded draws: only tokens top_k keeps, at frequencies within 0.05 of softmax(scores / 0.4)."""
    logits = _logits(4)
    params = dict(temperature=0.4, top_k=4, seed=11, max_new_tokens=1)
    expected = torch.softmax(_reference(logits, TemperatureLogitsWarper(0.4), TopKLogitsWarper(4)), -1)
    seq = _seq(**params)
    rows = 2000
    tokens, _, failed = sampler.sample(logits.expand(rows, VOCAB).clone(), [seq] * rows)  # one generator: a stream of draws
    assert not failed
    counts = torch.bincount(torch.tensor(tokens), minlength=VOCAB).float() / rows
    assert set(torch.nonzero(counts).flatten().tolist()) <= set(torch.nonzero(expected).flatten().tolist())
    assert (counts - expected).abs().max() < 0.05
    again, _, _ = sampler.sample(logits.expand(rows, VOCAB).clone(), [_seq(**params)] * rows)
    assert again == tokens  # the same seed, the same draws
    other, _, _ = sampler.sample(logits.expand(rows, VOCAB).clone(), [_seq(**{**params, "seed": 12})] * rows)
    assert other != tokens


def test_a_row_with_a_nan_or_with_every_token_ruled_out_fails_alone() -> None:
    """NaN in one score, or every score -inf, fails that row; a +inf score or a mostly masked row is still sampled."""
    rows = torch.stack([_logits(i) for i in range(5)])
    rows[0, 17] = float("nan")
    rows[1] = float("-inf")
    rows[2, :-1] = float("-inf")  # one token left: it is the choice
    rows[3, 9] = float("inf")
    tokens, _, failed = sampler.sample(rows, [_seq(max_new_tokens=1) for _ in range(5)])
    assert sorted(failed) == [0, 1] and all(isinstance(e, sampler.SamplingError) for e in failed.values())
    assert tokens[2] == VOCAB - 1 and tokens[3] == 9 and tokens[4] == int(_logits(4).argmax())
