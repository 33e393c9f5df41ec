"""Prompt-lookup (n-gram) speculative decoding: propose a request's next tokens from its own context, verify them
in the step's one forward pass.

Decode is memory-bound, so a forward pass over a request's last token plus k proposed ones costs little more than
over the last token alone. The proposal is what followed the most recent earlier occurrence of the request's last n
tokens (n from ``--speculative-ngram`` down to 1) in its own prompt and output, which pays on output that copies its
input (extraction, editing, quoting, code changes). Proposals never cross requests: each comes from its own tokens
and is verified under its own adapter, as 1 + k decode rows in the same batch as everyone's (each row sees the cache
up to its own position), so a verify step is still one batched attention call, and a CUDA-graph bucket on cuda.

Verification (output.py) samples each position in turn exactly as plain decoding would: the same penalties, grammar
and generator, drawing one value per emitted token, and keeps going while the token drawn equals the proposal. For a
proposal that is one token, not a distribution, that is the rejection-sampling rule itself (accept the proposal with
probability p(proposal); on rejection the token drawn is distributed as p without the proposal), so greedy output is
token for token and seeded sampling draw for draw what it is with speculation off.

Adaptive per request: the budget grows while every proposal is accepted and halves when none is; at 0 the request
waits a number of steps (doubling, up to ``MAX_PAUSE``) before it probes again with one token, so output that never
repeats pays only the lookup.
"""

from __future__ import annotations

from array import array

from lorafleet.server.engine.sequence import Sequence

FIRST_PAUSE = 4  # decode steps a request waits after its budget reached 0, before probing with one token
MAX_PAUSE = 64


def propose(tokens: list[int], max_ngram: int, k: int) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix of ``tokens`` (at most
    ``max_ngram`` long) that occurred before; [] when none did."""
    if k <= 0 or len(tokens) < 2:
        return []
    hay = array("i", tokens).tobytes()  # bytes.rfind is C-fast; a match must start on a 4-byte token boundary
    end = len(hay) - 4  # occurrences inside tokens[:-1]: the suffix itself is not one
    for n in range(min(max_ngram, len(tokens) - 1), 0, -1):
        needle = hay[-4 * n:]
        pos = hay.rfind(needle, 0, end)
        while pos > 0 and pos % 4:
            pos = hay.rfind(needle, 0, pos + len(needle) - 1)
        if pos != -1:
            start = pos // 4 + n
            return tokens[start:start + k]
    return []


class NgramSpeculator:
    """Proposes per request and adapts each request's budget to what it accepts; counts for /metrics."""

    def __init__(self, max_tokens: int, max_ngram: int) -> None:
        self.max_tokens, self.max_ngram = max_tokens, max_ngram
        self.num_draft_tokens = 0  # proposed and verified (vllm:spec_decode_num_draft_tokens)
        self.num_accepted_tokens = 0  # of those, accepted (vllm:spec_decode_num_accepted_tokens)
        self.num_drafts = 0  # verify rows run (vllm:spec_decode_num_drafts)

    def draft(self, seq: Sequence) -> list[int]:
        """What ``seq`` proposes this step (it is decoding: one token uncomputed); [] to decode one token as usual."""
        if not seq.params.speculative:
            return []
        budget = self.max_tokens if seq.draft_budget is None else seq.draft_budget
        if budget == 0:
            seq.draft_pause -= 1
            if seq.draft_pause > 0:
                return []
            budget = 1  # probe: the output may have started copying
        room = seq.params.max_new_tokens - len(seq.generated_ids) - 1  # the bonus token must fit the limit too
        return propose(seq.token_ids, self.max_ngram, min(budget, room))

    def verified(self, seq: Sequence, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        seq.num_draft_tokens += proposed
        seq.num_accepted_tokens += accepted
        budget = self.max_tokens if seq.draft_budget is None else max(seq.draft_budget, 1)
        if accepted == proposed:
            seq.draft_budget, seq.draft_backoff = min(self.max_tokens, 2 * budget), FIRST_PAUSE
        elif accepted:
            seq.draft_budget, seq.draft_backoff = max(1, min(budget, accepted + 1)), FIRST_PAUSE
        else:
            seq.draft_budget = budget // 2
            if seq.draft_budget == 0:
                seq.draft_pause = seq.draft_backoff
                seq.draft_backoff = min(MAX_PAUSE, 2 * seq.draft_backoff)
