"""The engine loop in one background thread, and an asyncio-facing API for the HTTP layer.

The forward pass holds the GIL only between kernels, so one engine thread leaves the event loop
free to accept and stream requests. Commands (add, cancel) cross into the thread through a queue
and are applied between steps; each request's events come back through its own asyncio queue.
A consumer that stops iterating (a client gone) cancels its request, and the next step frees its
KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

from lorafleet.adapter_ref import AdapterRef
from lorafleet.server.engine.engine import LLMEngine
from lorafleet.server.engine.output import StepOutput
from lorafleet.server.engine.sequence import FinishReason, SamplingParams, Sequence, TokenInfo
from lorafleet.server.errors import Conflict

log = logging.getLogger(__name__)
# A step that raises fails the requests in it; the replica reports unhealthy (and is restarted by
# its liveness probe) only when this many steps in a row fail, which no single request can cause.
UNHEALTHY_AFTER_FAILED_STEPS = 3


@dataclass(slots=True)
class TokenEvent:
    token: TokenInfo | None
    finish_reason: FinishReason | None = None
    seq: Sequence | None = None  # set on the last event: the finished sequence, for its details
    adapter_tier: str = ""  # where the request found its adapter on arrival: device (hot), cpu, loading (cold); "" for the base

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Handle:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.events: asyncio.Queue[TokenEvent | BaseException] = asyncio.Queue()
        self.seq: Sequence | None = None

    def put(self, item: TokenEvent | BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.Queue[tuple] = queue.Queue()
        self._handles: dict[int, _Handle] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: str | None = None
        self.consecutive_failures = 0
        self._settling: list[tuple[str, asyncio.Future]] = []  # (adapter key, future) of admin loads awaiting a device slot
        engine.adapters.on_settled = lambda: self._commands.put(("wake",))

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lorafleet-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._commands.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def healthy(self) -> bool:
        """Unhealthy only while steps keep failing: one failed step (one bad batch) is not a broken replica."""
        return self.consecutive_failures < UNHEALTHY_AFTER_FAILED_STEPS

    @property
    def num_requests(self) -> int:
        return len(self._handles)

    # -- the API ------------------------------------------------------------------------------

    async def generate(self, prompt_ids: list[int], params: SamplingParams, adapter: AdapterRef | None = None, token: str | None = None) -> AsyncIterator[TokenEvent]:
        """Yield one event per generated token; the last one carries the finish reason and sequence.

        A bad request or an adapter that cannot be loaded raises before the first event.
        """
        handle = _Handle(asyncio.get_running_loop())
        self._commands.put(("add", handle, prompt_ids, params, adapter, token))
        finished = False
        try:
            while True:
                item = await handle.events.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._commands.put(("cancel", handle))

    async def adapter_on_device(self, key: str) -> None:
        """Resolves once adapter ``key`` holds a device slot; raises its load error, or Conflict if it was unloaded
        meanwhile. One awaited future: the engine thread settles it when a load ends (loaders wake it) or a slot frees."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._commands.put(("settle", key, future))
        await future

    # -- the engine thread ----------------------------------------------------------------------

    def _settle(self) -> None:
        """Resolve the admin loads whose adapter reached a device slot, failed or was unloaded (engine thread)."""
        manager, waiting = self.engine.adapters, []
        manager.settle()
        self._settling = [(key, future) for key, future in self._settling if not future.cancelled()]  # callers that left
        ready = [key for key, _ in self._settling if (state := manager.states.get(key)) is not None and state.status == "cpu"]
        if ready:  # a free slot takes them now, not at the next request's step; what waiting requests want still goes first
            running, wanted = self.engine.scheduler.adapters_in_use()
            manager.between_steps(running, list(dict.fromkeys([*wanted, *ready])))
        for key, future in self._settling:
            state = manager.states.get(key)
            outcome: BaseException | None = None
            if state is None:
                outcome = Conflict(f"adapter {key} was unloaded while loading")
            elif state.status == "failed" and state.error is not None:
                outcome = state.error
            elif state.status != "device":
                waiting.append((key, future))
                continue
            future.get_loop().call_soon_threadsafe(_resolve, future, outcome)
        self._settling = waiting

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, handle, prompt_ids, params, adapter, token = command
            try:
                key = self.engine.adapters.request(adapter, token, caller=params.cache_salt) if adapter is not None else None
                handle.seq = self.engine.add_request(prompt_ids, params, key)
                if key is not None:
                    handle.seq.adapter_tier = self.engine.adapters.states[key].status
            except Exception as exc:  # validation and adapter errors belong to this request alone
                handle.put(exc)
                return
            self._handles[id(handle.seq)] = handle
        elif kind == "call":
            command[1]()
        elif kind == "settle":
            self._settling.append((command[1], command[2]))
        elif kind == "wake" and not self._stop.is_set():  # a loader finished: apply its outcome now, idle or not
            self.engine.adapters.settle()
        elif kind == "abort":
            self._fail_all(command[1], wrap=False)
        elif kind == "cancel":
            seq = command[1].seq
            if seq is not None and not seq.finished:
                self.engine.cancel(seq)

    def _deliver(self, output: StepOutput) -> None:
        handle = self._handles.get(id(output.seq))
        if handle is None:
            return
        if output.finished and output.seq.adapter is not None:
            state = self.engine.adapters.states.get(output.seq.adapter)
            if state is not None:
                output.seq.adapter_load = (dict(state.load_seconds), state.tier_hit)
        reason = output.seq.finish_reason if output.finished else None
        if reason is FinishReason.ERROR and output.seq.error is not None:
            handle.put(output.seq.error)
        else:
            handle.put(TokenEvent(output.token, reason, output.seq if output.finished else None, output.seq.adapter_tier))
        if output.finished:
            del self._handles[id(output.seq)]

    def call(self, fn, *args):  # noqa: ANN001, ANN201
        """Run ``fn(*args)`` on the engine thread between steps and await its result (admin actions)."""
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        loop = future.get_loop()

        def run() -> None:
            try:
                result = fn(*args)
            except Exception as exc:
                loop.call_soon_threadsafe(future.set_exception, exc)
            else:
                loop.call_soon_threadsafe(future.set_result, result)

        self._commands.put(("call", run))
        return future

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                # Idle: wait for work. Busy: apply whatever arrived, then step.
                idle = not self.engine.has_work()
                command = self._commands.get(timeout=0.5) if idle else self._commands.get_nowait()
                self._apply(command)
                if self._settling:  # here too: a steady stream of commands (probes, listings) never lets the queue run dry
                    self._settle()
                continue  # drain every pending command before the next step
            except queue.Empty:
                pass
            if self._settling:
                self._settle()
            if not self.engine.has_work():
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a failed step fails its requests, never the process
                log.exception("engine step failed")
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.consecutive_failures += 1
                self._fail_all(exc)
                continue
            self.consecutive_failures = 0
            for output in outputs:
                self._deliver(output)

    def abort_all(self, exc: Exception) -> None:
        """End every request now with ``exc`` (shutdown past its grace period), between steps."""
        self._commands.put(("abort", exc))

    def _fail_all(self, exc: Exception, wrap: bool = True) -> None:
        for handle in list(self._handles.values()):
            if handle.seq is not None:
                self.engine.cancel(handle.seq)
            handle.put(RuntimeError(f"generation failed: {exc}") if wrap else exc)
        self._handles.clear()
        self.engine.scheduler.take_cancelled()


def _resolve(future: asyncio.Future, outcome: BaseException | None) -> None:
    """On the future's loop: settle it unless its waiter already gave up."""
    if future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
