"""Choosing each row's next token: penalties, warpers, greedy or seeded sampling, log-probabilities.

Every row carries its own parameters and, when sampling, its own ``torch.Generator`` seeded from
the request, so a seeded request draws the same tokens whatever else shares its batch. Order
follows transformers: repetition penalty, then frequency/presence penalties, temperature, top-k,
top-p, typical-p. Reported log-probabilities are those of the distribution after penalties and
temperature, before the top-k/top-p/typical cuts.
"""

from __future__ import annotations

from collections import Counter

import torch

from lorafleet.server.sequence import Sequence

NEG_INF = float("-inf")


def _apply_penalties(scores: torch.Tensor, seq: Sequence) -> None:
    p = seq.params
    if p.repetition_penalty is not None and p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=scores.device)
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if p.frequency_penalty or p.presence_penalty:
        counts = Counter(seq.generated_ids)
        if counts:
            ids = torch.tensor(list(counts), dtype=torch.long, device=scores.device)
            freq = torch.tensor(list(counts.values()), dtype=scores.dtype, device=scores.device)
            scores[ids] -= p.frequency_penalty * freq + p.presence_penalty


def _warp(scores: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """Top-k, top-p and typical-p cuts on already temperature-scaled scores."""
    p = seq.params
    if p.top_k:
        k = min(p.top_k, scores.shape[-1])
        threshold = torch.topk(scores, k).values[-1]
        scores = scores.masked_fill(scores < threshold, NEG_INF)
    if p.top_p is not None and p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= 1 - p.top_p
        remove[-1] = False
        scores = scores.masked_fill(remove.scatter(0, order, remove), NEG_INF)
    if p.typical_p is not None and p.typical_p < 1.0:
        logp = scores.log_softmax(-1)
        probs = logp.exp()
        entropy = -torch.nansum(probs * logp)
        shifted = (-logp - entropy).abs()
        sorted_shift, order = torch.sort(shifted)
        cumulative = probs.gather(0, order).cumsum(-1)
        last = int((cumulative < p.typical_p).sum().clamp(max=scores.shape[-1] - 1))
        remove = sorted_shift > sorted_shift[last]
        scores = scores.masked_fill(remove.scatter(0, order, remove), NEG_INF)
    return scores


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor]:
    """Next token of each row and the log-softmax those tokens were judged by ([rows, vocab])."""
    scores = logits.float().clone()
    for row, seq in enumerate(seqs):
        _apply_penalties(scores[row], seq)
        t = seq.params.temperature
        if seq.params.sampling and t is not None and t not in (0.0, 1.0):
            scores[row] /= t
        if seq.constraint is not None:
            seq.constraint.mask(scores[row])
    logprobs = scores.log_softmax(-1)
    chosen = scores.argmax(-1).tolist()
    for row, seq in enumerate(seqs):
        if seq.params.sampling:
            probs = _warp(scores[row], seq).softmax(-1)
            chosen[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return chosen, logprobs
