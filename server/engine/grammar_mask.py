"""One request's grammar state, and the bound on what its per-token mask may cost the engine that steps everyone.

Each mask is computed on a thread of its own (xgrammar releases the GIL while it fills the bitmask), started before
the forward pass where the engine knows a row will sample, so an ordinary JSON mask costs the step nothing. A mask not
ready when the pass ends costs the step nothing either: its row is parked with its logits (output.py) while the other
rows go on, and is sampled at the first step after the mask is filled. Past ``MASK_DEADLINE_S`` the row fails alone
with a 422 and the thread that is still filling is niced and left to finish (xgrammar cannot be interrupted). Before,
a mask ran on the engine thread and the last step of a costly pattern stalled every request on the replica for up to
0.7 s (the soak's slow-schema attackers: normal clients' TTFT p99 2.9x); then the engine waited up to the deadline for
it, every row with it (2.2x).

A mask's cost is the filling thread's own CPU time, not wall time: on a loaded machine a 2 ms mask can wait for a
core, and that is not the grammar's fault (nor a reason to refuse the schema to everyone afterwards).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from lorafleet.server.background import lower_thread_priority
from lorafleet.server.errors import ValidationError

# What one row's grammar may take to mask one token: a JSON schema or json_object takes under 2 ms on SmolLM2's 49K
# vocabulary here. A pattern such as ``^((.{1,60}){1,20}){1,20}$`` compiles in milliseconds and then costs more with
# every token (14 ms, 34 ms, 114 ms, 298 ms, 608 ms at tokens 11-17 of one sampled run on the tiny test vocabulary).
# 25 ms is 12x the worst JSON mask measured; a grammar that crossed it is remembered and refused at once next time.
MASK_BUDGET_S = 0.025
MASK_OVER_BUDGET_IN_A_ROW = 2  # one costly position may be the schema's (a long enum); two in a row are its pattern
# The longest one row waits for its mask (past the forward pass it overlapped) before it fails: 4x the budget, so a
# mask within budget that waited for a core on a loaded machine is not cut short. Only that row waits (it is parked).
MASK_DEADLINE_S = 0.1


class GrammarTooCostly(ValidationError):
    """A response format whose grammar costs the shared engine too much per token: its request fails alone (422)."""


class _Fill(threading.Thread):
    """One bitmask being filled. Abandoned past the deadline, it finishes niced and, if its CPU time shows the grammar
    was costly (not the machine slow), has the grammar remembered as too costly."""

    def __init__(self, matcher: Any, bitmask: torch.Tensor, on_costly_late: Callable[[], None]) -> None:
        super().__init__(name="lorafleet-grammar-mask", daemon=True)
        self.matcher, self.bitmask, self.on_costly_late = matcher, bitmask, on_costly_late
        self.cpu_s = 0.0
        self.error: Exception | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        started = time.thread_time()
        try:
            self.matcher.fill_next_token_bitmask(self.bitmask)
        except Exception as exc:  # noqa: BLE001 - handed to the engine thread, which fails the row with it
            self.error = exc
        self.cpu_s = time.thread_time() - started
        with self._lock:
            self.done.set()
            late = self._abandoned
        if late and self.cpu_s > MASK_BUDGET_S:
            self.on_costly_late()

    def abandon(self) -> bool:
        """Stop waiting for it: False if it finished meanwhile (its mask is then used as usual)."""
        with self._lock:
            if self.done.is_set():
                return False
            self._abandoned = True
        lower_thread_priority(self.native_id)
        return True


class Constraint:
    """One request's grammar state: which tokens may come next, advanced by each accepted token."""

    def __init__(self, compiled: Any, vocab_size: int, on_too_costly: Callable[[], None] = lambda: None) -> None:
        import xgrammar as xgr

        self._xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.over_budget = 0  # steps in a row whose mask took more than MASK_BUDGET_S
        self.on_too_costly = on_too_costly
        self._fill: _Fill | None = None
        self._wanted_at: float | None = None  # when the engine first asked for the current mask (its deadline counts from it)
        self.abandoned = False  # a mask ran past the deadline: the matcher is its thread's until it ends

    def start(self) -> None:
        """Begin filling the next token's mask (the engine calls this before the forward pass of a step that samples
        this row); ``mask`` waits for it."""
        if self._fill is None and not self.abandoned:
            self._fill = _Fill(self.matcher, self.bitmask, self.on_too_costly)
            self._fill.start()

    def ready(self) -> bool:
        """Whether ``mask`` would answer without waiting: the mask is filled, or its deadline has passed (``mask`` then
        fails the row). The first call after a token starts the deadline's clock."""
        self.start()
        now = time.monotonic()
        if self._wanted_at is None:
            self._wanted_at = now
        return self._fill is None or self._fill.done.is_set() or now - self._wanted_at >= MASK_DEADLINE_S

    def wait(self, timeout: float) -> None:
        """Until the mask is filled, at most ``timeout`` (an engine with nothing else to run)."""
        if self._fill is not None:
            self._fill.done.wait(timeout)

    def mask(self, scores: torch.Tensor) -> None:
        """Set every token the grammar forbids to -inf in a [vocab] row, in place; GrammarTooCostly when the mask is not
        ready ``MASK_DEADLINE_S`` after the engine asked for it, or cost more than ``MASK_BUDGET_S`` of CPU
        ``MASK_OVER_BUDGET_IN_A_ROW`` steps in a row."""
        self.start()
        fill = self._fill
        assert fill is not None, "mask() after the row's grammar was abandoned"
        wanted_at, self._wanted_at = self._wanted_at or time.monotonic(), None
        if not fill.done.wait(max(0.0, wanted_at + MASK_DEADLINE_S - time.monotonic())) and fill.abandon():
            self.abandoned = True
            if self.over_budget + 1 >= MASK_OVER_BUDGET_IN_A_ROW:
                self.on_too_costly()  # else remembered once the thread ends, if its CPU time says so
            raise GrammarTooCostly(f"the response_format's grammar took over {MASK_DEADLINE_S * 1000:.0f} ms to choose one token: "
                                   "a pattern this ambiguous slows every request on the replica; simplify it (nested repetitions such "
                                   "as ((.{1,60}){1,20}){1,20})")
        self._fill = None
        if fill.error is not None:
            raise fill.error
        self.over_budget = self.over_budget + 1 if fill.cpu_s > MASK_BUDGET_S else 0
        if self.over_budget >= MASK_OVER_BUDGET_IN_A_ROW:
            self.on_too_costly()
            raise GrammarTooCostly(f"the response_format's grammar took {fill.cpu_s * 1000:.0f} ms to choose one token, over "
                                   f"{MASK_BUDGET_S * 1000:.0f} ms {self.over_budget} steps in a row: a pattern this ambiguous "
                                   "slows every request on the replica; simplify it (nested repetitions such as ((.{1,60}){1,20}){1,20})")
        self._xgr.apply_token_bitmask_inplace(scores.unsqueeze(0), self.bitmask)

    def accept(self, token_id: int) -> None:
        if self._fill is not None:  # a mask filled ahead for a step that did not sample this row: stale after this token
            self._fill.done.wait()
            self._fill = None
        self._wanted_at = None
        self.matcher.accept_token(token_id)
