"""What a step's forward pass means for each request: computed tokens advance, prompt logprobs are recorded, full
blocks are offered to the prefix cache, the next token is sampled and appended (detokenized, checked against stop
strings, EOS and the length limit), and a request that ends is finished. A row that fails (no token could be chosen,
its grammar or detokenizing raised) ends alone with its error; the batch goes on. A row whose grammar mask is still
filling when the pass ends is parked with its logits instead of holding up the batch, and sampled from them at a
later step (the same token it would have had: nothing it is sampled from changes while it waits).

nano-vllm's ``Scheduler.postprocess`` and vLLM's output processor have this job.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorafleet.server.engine import detokenizer
from lorafleet.server.engine.blocks import PrefixCache
from lorafleet.server.engine.sampler import SamplingError, sample
from lorafleet.server.engine.scheduler import ScheduledChunk, Scheduler
from lorafleet.server.engine.sequence import FinishReason, Sequence, Status, TokenInfo
from lorafleet.server.engine.speculation import NgramSpeculator
from lorafleet.server.errors import RequestError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StepOutput:
    seq: Sequence
    token: TokenInfo | None  # None when the sequence ended without a new token (cancelled)
    finished: bool


def _position_free(seq: Sequence) -> bool:
    """Greedy, with no penalty or grammar: a position's token depends on its logits alone, not on the tokens appended
    before it in the same step, so a verify chunk's positions can be judged in one batched call."""
    p = seq.params
    return not p.sampling and p.repetition_penalty in (None, 1.0) and not p.frequency_penalty and not p.presence_penalty and seq.constraint is None


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_ids: set[int], scheduler: Scheduler, logits: Callable[[torch.Tensor], torch.Tensor],
                 prefix: PrefixCache | None, speculator: NgramSpeculator | None = None) -> None:
        self.tokenizer, self.eos_ids, self.scheduler, self.logits, self.prefix = tokenizer, eos_ids, scheduler, logits, prefix
        self.speculator = speculator
        self.special_ids = set(getattr(tokenizer, "all_special_ids", []))

    def process(self, chunks: list[ScheduledChunk], hidden: torch.Tensor) -> list[StepOutput]:
        sample_rows, sample_seqs, verify, verify_rows, outputs = [], [], [], [], []
        offset = 0
        for chunk in chunks:
            seq = chunk.seq
            end = offset + chunk.num_tokens
            samples = chunk.samples
            if seq.params.prefill_logprobs and seq.num_computed < seq.num_prompt and seq.num_preemptions == 0:
                self._record_prefill_logprobs(seq, hidden[offset:end])
            seq.num_computed += chunk.num_tokens
            if self.prefix is not None:
                self.prefix.register(seq)
            if chunk.draft:
                verify.append(chunk)
                verify_rows.extend(range(end - 1, end + len(chunk.draft)))  # the last token's row and each proposal's
            elif samples:
                sample_rows.append(end - 1)
                sample_seqs.append(seq)
            offset = end + len(chunk.draft)
        if not sample_rows and not verify_rows:
            return outputs
        logits = self.logits(hidden[sample_rows + verify_rows])  # one projection onto the vocabulary for the whole step
        at = len(sample_seqs)
        if sample_seqs:
            outputs += self._sample_rows(logits[:at], sample_seqs)
        spans, rows, row_seqs = [], [], []
        for chunk in verify:
            width, free = len(chunk.draft) + 1, _position_free(chunk.seq)
            spans.append((chunk, at, width, free))
            if free:  # all of its positions judged in one batched call
                rows.extend(range(at, at + width))
                row_seqs.extend([chunk.seq] * width)
            at += width
        tokens, logprobs, failed = sample(logits[rows], row_seqs) if rows else ([], None, {})
        offset = 0
        for chunk, at, width, free in spans:
            pre = None
            if free:
                pre = (tokens[offset:offset + width], logprobs[offset:offset + width],
                       {r - offset: exc for r, exc in failed.items() if offset <= r < offset + width})
                offset += width
            outputs.extend(self._verify(chunk.seq, chunk.draft, logits[at:at + width], pre))
        return outputs

    def _sample_rows(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[StepOutput]:
        """Sample and append one token per row; a row whose grammar mask is not filled yet is parked instead."""
        waiting = {row for row, seq in enumerate(seqs) if seq.constraint is not None and not seq.constraint.ready()}
        for row in waiting:
            seqs[row].parked_logits = logits[row].clone()
            self.scheduler.park(seqs[row])
        if waiting:
            keep = [row for row in range(len(seqs)) if row not in waiting]
            logits, seqs = logits[keep], [seqs[row] for row in keep]
        if not seqs:
            return []
        outputs = []
        tokens, logprobs, failed = sample(logits, seqs)
        for row, (seq, token_id) in enumerate(zip(seqs, tokens)):
            if row not in failed:
                try:
                    outputs.append(self._append(seq, token_id, logprobs[row]))
                    continue
                except Exception as exc:  # noqa: BLE001 - detokenizing or the grammar: this row's failure alone
                    failed[row] = exc
            outputs.append(self._fail_row(seq, failed[row]))
        return outputs

    def unpark(self) -> list[StepOutput]:
        """Parked rows whose mask is filled, or whose deadline has passed (they fail), chosen from their kept logits:
        they are running again, and decode in the step that follows."""
        ready = [seq for seq in self.scheduler.parked if seq.constraint.ready()]
        if not ready:
            return []
        logits = torch.stack([seq.parked_logits for seq in ready])
        for seq in ready:
            seq.parked_logits = None
            self.scheduler.unpark(seq)
        return self._sample_rows(logits, ready)

    def wait_parked(self, timeout: float) -> None:
        """Nothing else can run: wait for the oldest parked row's mask, at most ``timeout``, instead of spinning."""
        if self.scheduler.parked:
            self.scheduler.parked[0].constraint.wait(timeout)

    def _verify(self, seq: Sequence, draft: list[int], logits: torch.Tensor, pre: tuple | None = None) -> list[StepOutput]:
        """Emit tokens position by position, each sampled as plain decoding would (the request's penalties, grammar and
        generator see every token before it), while the token equals the proposal; the first that differs, or the one
        after the last proposal, is the step's last (speculation.py says why this is exact). ``pre``: every position
        already judged, for a greedy request whose scores do not depend on the tokens before (``_position_free``).
        Blocks held for rejected proposals go back to the pool."""
        outputs, accepted = [], 0
        for j in range(len(draft) + 1):
            if pre is not None:
                tokens, logprobs, failed = pre[0][j:j + 1], pre[1][j:j + 1], {0: pre[2][j]} if j in pre[2] else {}
            else:
                tokens, logprobs, failed = sample(logits[j:j + 1], [seq])
            try:
                if failed:
                    raise failed[0]
                out = self._append(seq, tokens[0], logprobs[0])
            except Exception as exc:  # noqa: BLE001 - this row's failure alone, as in a decode step
                outputs.append(self._fail_row(seq, exc))
                return outputs
            outputs.append(out)
            if out.finished or j == len(draft) or tokens[0] != draft[j]:
                break
            accepted += 1
        if self.speculator is not None:
            self.speculator.verified(seq, len(draft), accepted)
        if not seq.finished:
            self.scheduler.allocator.shrink(seq.block_table, len(seq.token_ids))
            if self.prefix is not None:
                self.prefix.register(seq)
        return outputs

    def _fail_row(self, seq: Sequence, exc: BaseException) -> StepOutput:
        log.warning("request %s failed alone (%s: %s)", seq.request_id, type(exc).__name__, exc)
        # The request's own input at fault (its grammar too costly) keeps its 4xx; anything else is a failed generation.
        return self.fail(seq, exc if isinstance(exc, (SamplingError, RequestError)) else SamplingError(f"{type(exc).__name__}: {exc}"))

    def fail(self, seq: Sequence, exc: BaseException) -> StepOutput:
        """One request's own failure: it ends with the error, its blocks are freed, the batch goes on."""
        seq.error = exc
        self.scheduler.finish(seq)
        return self.end(seq, FinishReason.ERROR)

    def end(self, seq: Sequence, reason: FinishReason) -> StepOutput:
        """The last output of a sequence that ends without a new token (cancelled, failed)."""
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        return StepOutput(seq, None, True)

    def _record_prefill_logprobs(self, seq: Sequence, hidden: torch.Tensor) -> None:
        """Log-probability of each prompt token given the ones before it (the first has none)."""
        logprobs = self.logits(hidden).log_softmax(-1)
        first = seq.num_computed
        if first == 0:
            seq.prefill.append(TokenInfo(seq.prompt_ids[0], self._token_text(seq.prompt_ids[0]), None))
        elif seq.prefill_carry is not None:
            token = seq.prompt_ids[first]
            seq.prefill.append(TokenInfo(token, self._token_text(token), float(seq.prefill_carry[token])))
        for i in range(logprobs.shape[0] - 1):
            token = seq.prompt_ids[first + i + 1]
            seq.prefill.append(TokenInfo(token, self._token_text(token), float(logprobs[i, token])))
        seq.prefill_carry = logprobs[-1]

    def _token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def _append(self, seq: Sequence, token_id: int, logprobs: torch.Tensor) -> StepOutput:
        seq.token_ids.append(token_id)
        if seq.constraint is not None:
            seq.constraint.accept(token_id)
        seq.num_computed = len(seq.token_ids) - 1
        special = token_id in self.special_ids
        alternatives = []
        if seq.params.alternatives:
            top = torch.topk(logprobs, seq.params.alternatives)
            alternatives = [TokenInfo(int(i), self._token_text(int(i)), float(lp), int(i) in self.special_ids) for lp, i in zip(top.values, top.indices)]
        text = detokenizer.next_text(self.tokenizer, seq)
        token = TokenInfo(token_id, text, float(logprobs[token_id]), special, alternatives)
        seq.tokens.append(token)
        seq.text += text
        reason = self._finish_reason(seq, token_id, token, text)
        if reason is not None:
            if reason is not FinishReason.STOP:
                tail = detokenizer.flush_text(self.tokenizer, seq)
                token.text += tail
                seq.text += tail
            self.scheduler.finish(seq)
            self.end(seq, reason)
        return StepOutput(seq, token, reason is not None)

    def _finish_reason(self, seq: Sequence, token_id: int, token: TokenInfo, text: str) -> FinishReason | None:
        if token_id in self.eos_ids and not seq.params.ignore_eos:
            return FinishReason.EOS
        if seq.params.stop:
            cut = detokenizer.find_stop(seq.text, len(text), seq.params.stop)
            if cut is not None:
                # The generated text ends with the matched stop sequence, and nothing after it.
                token.text = text[: len(text) - (len(seq.text) - cut)]
                seq.text = seq.text[:cut]
                return FinishReason.STOP
        if len(seq.generated_ids) >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        return None
