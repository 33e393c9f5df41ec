"""Prompt-lookup (n-gram) speculative decoding: propose a request's next tokens from its own context, verify them
in the step's one forward pass.

Decode is memory-bound, so a forward pass over a request's last token plus k proposed ones costs little more than
over the last token alone. The proposal is what followed the most recent earlier occurrence of the request's last n
tokens (n from ``--speculative-ngram`` down to 2: a one-token match proposes noise more often than not) in its own prompt and output, which pays on output that copies its
input (extraction, editing, quoting, code changes). Proposals never cross requests: each comes from its own tokens
and is verified under its own adapter, as 1 + k decode rows in the same batch as everyone's (each row sees the cache
up to its own position), so a verify step is still one batched attention call, and a CUDA-graph bucket on cuda.

Verification (output.py) samples each position in turn exactly as plain decoding would: the same penalties, grammar
and generator, drawing one value per emitted token, and keeps going while the token drawn equals the proposal. For a
proposal that is one token, not a distribution, that is the rejection-sampling rule itself (accept the proposal with
probability p(proposal); on rejection the token drawn is distributed as p without the proposal), so greedy output is
token for token and seeded sampling draw for draw what it is with speculation off.

Adaptive, by what a proposal costs and what it is worth. A proposed token adds a row to the step, which costs every
request in the batch time: on a GPU little until the batch is large, on a CPU (compute-bound from a few rows) about a
row's share of the step. The speculator fits step time = a + b * rows over recent decode steps, so one more row
costs b out of a step of a + b * n that yields n tokens: the row pays when its chance of being accepted exceeds
``b * n / (a + b * n)`` (times ``MARGIN``). Each request's chance that its next proposal is accepted is tracked from its own outcomes
(decayed, starting at one half), and the i-th proposed token counts as accepted with that chance to the i-th power
(proposals are accepted as a prefix). A request proposes as many tokens as pay, up to ``--speculative-tokens``; when
none do it waits some steps (doubling, up to ``MAX_PAUSE``) and probes with one token, so output that never repeats
pays only the lookup and the rare probe.
"""

from __future__ import annotations

from array import array

from lorafleet.server.engine.sequence import Sequence

FIRST_PAUSE = 4  # decode steps a request waits when no proposal pays, before probing with one token
MAX_PAUSE = 64
DECAY = 0.8  # of a request's acceptance record per verification: its last several outcomes count
# A proposal must pay back this multiple of its fitted cost: the straight line misses that rows cost more as the batch
# grows (SmolLM2 on 2 CPU cores at 16 running, 430-token contexts: 4.3 ms a row near 16 rows, 5-6 ms beyond 20, as
# each row gathers its whole context), and each verifying request adds host work no row counts (lookup, appends).
MARGIN = 1.25


def propose(tokens: list[int], max_ngram: int, k: int, min_ngram: int = 1) -> list[int]:
    """Up to ``k`` tokens that followed the most recent earlier occurrence of the longest suffix of ``tokens`` (at most
    ``max_ngram``, at least ``min_ngram`` long) that occurred before; [] when none did."""
    if k <= 0 or len(tokens) < 2:
        return []
    hay = array("i", tokens).tobytes()  # bytes.rfind is C-fast; a match must start on a 4-byte token boundary
    end = len(hay) - 4  # occurrences inside tokens[:-1]: the suffix itself is not one
    for n in range(min(max_ngram, len(tokens) - 1), min_ngram - 1, -1):
        needle = hay[-4 * n:]
        pos = hay.rfind(needle, 0, end)
        while pos > 0 and pos % 4:
            pos = hay.rfind(needle, 0, pos + len(needle) - 1)
        if pos != -1:
            start = pos // 4 + n
            return tokens[start:start + k]
    return []


class StepCost:
    """Step time = a + b * rows, fitted by decayed least squares over recent decode-only steps."""

    DECAY = 0.98  # about the last 50 steps

    def __init__(self) -> None:
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        d = self.DECAY
        self.w, self.x, self.y = d * self.w + 1, d * self.x + rows, d * self.y + seconds
        self.xx, self.xy = d * self.xx + rows * rows, d * self.xy + rows * seconds

    def per_row_share(self, rows: int) -> float:
        """b * rows / (a + b * rows): what one more row costs, as a share of a token's time. 0 (proposals are free)
        until the steps seen differ enough in size to tell a from b."""
        if self.w < 4:
            return 0.0
        mean_x, mean_y = self.x / self.w, self.y / self.w
        var = self.xx / self.w - mean_x * mean_x
        if var < 0.25:  # every step the same size: the slope is not known yet
            return 0.0
        b = max(0.0, (self.xy / self.w - mean_x * mean_y) / var)
        a = max(1e-6, mean_y - b * mean_x)
        return b * rows / (a + b * rows)


class NgramSpeculator:
    """Proposes per request as many tokens as pay (see the module's docstring); counts for /metrics."""

    def __init__(self, max_tokens: int, max_ngram: int) -> None:
        self.max_tokens, self.max_ngram = max_tokens, max_ngram
        self.min_ngram = min(2, max_ngram)  # a one-token match proposes noise more often than not
        self.cost = StepCost()
        self.threshold = 0.0  # the acceptance chance a proposed token needs this step
        self.num_draft_tokens = 0  # proposed and verified (vllm:spec_decode_num_draft_tokens)
        self.num_accepted_tokens = 0  # of those, accepted (vllm:spec_decode_num_accepted_tokens)
        self.num_drafts = 0  # verify rows run (vllm:spec_decode_num_drafts)

    def begin_step(self, running: int) -> None:
        self.threshold = min(0.95, MARGIN * self.cost.per_row_share(running))

    def tokens_that_pay(self, seq: Sequence) -> int:
        chance = (seq.spec_hits + 1) / (seq.spec_tries + 2)
        k, worth = 0, chance
        while k < self.max_tokens and worth > self.threshold:
            k, worth = k + 1, worth * chance
        return k

    def draft(self, seq: Sequence) -> list[int]:
        """What ``seq`` proposes this step (it is decoding: one token uncomputed); [] to decode one token as usual."""
        if not seq.params.speculative:
            return []
        if seq.draft_pause > 0:
            seq.draft_pause -= 1
            if seq.draft_pause > 0:
                return []
            k = 1  # probe: the output may have started copying
        else:
            k = self.tokens_that_pay(seq)
            if k == 0:
                seq.draft_pause, seq.draft_backoff = seq.draft_backoff, min(MAX_PAUSE, 2 * seq.draft_backoff)
                return []
        room = seq.params.max_new_tokens - len(seq.generated_ids) - 1  # the bonus token must fit the limit too
        return propose(seq.token_ids, self.max_ngram, min(k, room), self.min_ngram)

    def verified(self, seq: Sequence, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        seq.num_draft_tokens += proposed
        seq.num_accepted_tokens += accepted
        # each proposed token judged until the first rejected one: accepted successes out of accepted (+1 if one failed)
        seq.spec_hits = DECAY * seq.spec_hits + accepted
        seq.spec_tries = DECAY * seq.spec_tries + accepted + (accepted < proposed)
        if accepted:
            seq.draft_backoff = FIRST_PAUSE
