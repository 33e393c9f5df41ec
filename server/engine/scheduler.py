"""Continuous batching: which sequences run this step, and how many of their tokens.

Every step, running sequences decode one token each and waiting ones are admitted first come,
first served, their prompts prefilled in chunks that share the step within the prefill budget.
When the block pool runs dry the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue to be recomputed later, so the oldest requests always make
progress (no starvation) and nothing is ever cut short. A waiting request that does not fit stops
admission (head of line), so a large request is never overtaken forever by small ones. A sequence whose next token
waits for its grammar mask is parked (output.py): it keeps its blocks and its adapter, and is not scheduled, preempted
or counted as running until its token is chosen.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lorafleet.server.config import EngineConfig
from lorafleet.server.engine.blocks import BlockAllocator, PrefixCache
from lorafleet.server.engine.sequence import Sequence, Status

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_tokens: int  # of its own tokens, from seq.num_computed on
    draft: list[int] = field(default_factory=list)  # tokens proposed after them, to verify in the same pass (speculation.py)

    @property
    def width(self) -> int:
        """Rows this chunk takes in the forward pass."""
        return self.num_tokens + len(self.draft)

    @property
    def samples(self) -> bool:
        """Whether this pass chooses a next token for its sequence (the chunk reaches its last token; before the pass)."""
        return self.seq.num_computed + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, config: EngineConfig, allocator: BlockAllocator, adapter_ready: Callable[[str | None], bool] | None = None,
                 prefix: PrefixCache | None = None, draft: Callable[[Sequence], list[int]] | None = None) -> None:
        self.config = config
        self.allocator = allocator
        self.adapter_ready = adapter_ready or (lambda adapter: adapter is None)
        self.prefix = prefix  # when prefix caching is on: admission starts from the cached blocks of a prompt
        self.draft = draft  # when speculating: a decoding sequence's proposed tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.parked: list[Sequence] = []  # computed up to their last token, waiting for its grammar mask
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.parked)

    @property
    def admitted(self) -> list[Sequence]:
        """Every sequence that holds blocks: running, or parked until its grammar mask is filled."""
        return [*self.running, *self.parked]

    def park(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.parked.append(seq)

    def unpark(self, seq: Sequence) -> None:
        self.parked.remove(seq)
        self.running.append(seq)

    def adapters_in_use(self) -> tuple[set[str], list[str]]:
        """(the adapters of running sequences, those waiting sequences want, oldest first): what the adapter manager
        must keep in its slots, and what it should bring into them next."""
        running = {s.adapter for s in self.admitted if s.adapter is not None}
        return running, list(dict.fromkeys(s.adapter for s in self.waiting if s.adapter is not None))

    def finish(self, seq: Sequence) -> None:
        self.allocator.free(seq.block_table)
        seq.parked_logits = None
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.parked:
            self.parked.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def take_cancelled(self) -> list[Sequence]:
        cancelled = [s for s in [*self.admitted, *self.waiting] if s.cancelled]
        for seq in cancelled:
            self.finish(seq)
        return cancelled

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and requeue it, to be recomputed from its tokens."""
        self.running.remove(seq)
        self.allocator.free(seq.block_table)
        seq.num_computed = 0
        seq.num_registered = 0
        seq.status = Status.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Keep the queue in arrival order: a preempted sequence is older than most that wait.
        index = next((i for i, s in enumerate(self.waiting) if s.arrival > seq.arrival), len(self.waiting))
        self.waiting.insert(index, seq)
        log.info("preempted %s (pool out of KV blocks); it will be recomputed", seq.request_id)

    def _reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow ``seq``'s table to hold ``num_tokens``, preempting newer sequences; False if ``seq`` itself was preempted."""
        while not self.allocator.can_grow(seq.block_table, num_tokens):
            victim = max(self.running, key=lambda s: s.arrival)
            self._preempt(victim)
            if victim is seq:
                return False
        self.allocator.grow(seq.block_table, num_tokens)
        return True

    def schedule(self) -> list[ScheduledChunk]:
        prefill_budget = self.config.max_batch_prefill_tokens
        chunks: list[ScheduledChunk] = []
        # Blocks the running sequences' next chunks may need (prefill chunks counted whole): proposals take only blocks
        # beyond those, so speculation never preempts anyone.
        def next_need(s: Sequence) -> int:
            return self.allocator.blocks_needed(s.block_table, s.num_computed + min(s.num_uncomputed, self.config.max_batch_prefill_tokens))

        needed = sum(map(next_need, self.running)) if self.draft is not None else 0
        # Oldest first: a preemption victim is always the newest, so it is never one already scheduled.
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq not in self.running:  # preempted while making room for an older one
                continue
            if self.draft is not None:
                needed -= next_need(seq)  # what the sequences after this one may still need
            if seq.num_uncomputed == 1:
                num_tokens = 1
                draft = self.draft(seq) if self.draft is not None else []
                with_draft = seq.num_computed + 1 + len(draft)
                if draft and self.allocator.num_free - self.allocator.blocks_needed(seq.block_table, with_draft) >= needed:
                    self.allocator.grow(seq.block_table, with_draft)
                    chunks.append(ScheduledChunk(seq, 1, draft))
                    continue
            else:
                num_tokens = min(seq.num_uncomputed, prefill_budget)
                if num_tokens == 0:
                    continue
            if self._reserve(seq, seq.num_computed + num_tokens):
                chunks.append(ScheduledChunk(seq, num_tokens))
                if num_tokens > 1:
                    prefill_budget -= num_tokens

        total_tokens = sum(len(s.token_ids) for s in self.admitted)
        for seq in list(self.waiting):
            if prefill_budget <= 0 or len(self.admitted) >= self.config.max_running_requests:
                break
            if not self.adapter_ready(seq.adapter):
                continue  # its adapter is not on the device yet; it must not hold up the others
            if total_tokens + len(seq.token_ids) > self.config.max_batch_total_tokens:
                break
            hits = self.prefix.take(seq) if self.prefix is not None else 0
            num_tokens = min(seq.num_uncomputed, prefill_budget)
            if not self.allocator.can_grow(seq.block_table, seq.num_computed + num_tokens):
                if self.prefix is not None:
                    self.prefix.give_back(seq)
                break
            self.allocator.grow(seq.block_table, seq.num_computed + num_tokens)
            if self.prefix is not None:
                self.prefix.admitted(seq, hits)
            self.waiting.remove(seq)
            seq.status = Status.RUNNING
            if seq.first_scheduled_at is None:
                seq.first_scheduled_at = time.monotonic()
            self.running.append(seq)
            total_tokens += len(seq.token_ids)
            prefill_budget -= num_tokens
            chunks.append(ScheduledChunk(seq, num_tokens))
        return chunks
