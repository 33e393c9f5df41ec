"""Schema compile workers run below the engine's priority from their first instruction on: a hostile schema stream
restarts them often (every timed-out compile kills one), and each start imports xgrammar and torch (~3 s of CPU)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.server.background import NICENESS
from lorafleet.server.engine.grammar_worker import CompileTimeout, _Worker

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`


def nice_and_cpu_seconds(pid: int) -> tuple[int, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on: the name may hold spaces
    return int(fields[16]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def info(tiny_models: dict[str, Path]) -> str:
    """The tiny model's vocabulary as a worker is sent it."""
    return make_engine(tiny_models["llama"]).grammar()._info.serialize_json()


def test_a_restarting_compile_worker_never_runs_at_the_engines_priority(info: str) -> None:
    worker = _Worker(info)
    starting = threading.Thread(target=worker._start, kwargs={"nice_first": True})  # a restart, after a kill
    starting.start()
    samples = []
    try:
        while starting.is_alive():
            if worker._process is not None:
                try:
                    samples.append(nice_and_cpu_seconds(worker._process.pid))
                except (FileNotFoundError, ProcessLookupError):
                    pass
            time.sleep(0.01)
        ours = os.getpriority(os.PRIO_PROCESS, 0)
        busy = [nice for nice, cpu in samples if cpu >= 0.2]  # past the interpreter's own start (~0.05 s)
        assert busy, "the worker started too fast to be observed"
        assert set(busy) == {min(19, ours + NICENESS)}, samples  # it imported xgrammar at the engine's priority
        assert worker.compile('{"type": "object"}', timeout=30)
    finally:
        starting.join()
        worker.kill()


def test_a_compile_waits_for_a_busy_pool_only_as_long_as_its_budget(info: str) -> None:
    """One worker busy with a schema that compiles for seconds: the next compile gets a 429 within its budget rather
    than waiting for it (the hostile soak: queued compiles went 30 s with no answer), and its schema is not marked slow."""
    from lorafleet.server.api.errors import classify
    from lorafleet.server.engine.grammar_worker import GrammarWorkers
    from lorafleet.server.errors import Overloaded

    workers = GrammarWorkers(info, 1)
    slow = json.dumps({"type": "string", "pattern": "^((.{1,20}){1,20}){1,20}$"})  # compiles for seconds on this vocabulary

    def hold_the_worker() -> None:
        with contextlib.suppress(CompileTimeout):
            workers.compile(slow, 6.0)

    busy = threading.Thread(target=hold_the_worker)
    try:
        assert workers.compile('{"type": "object"}', timeout=30)  # the worker has started
        busy.start()
        time.sleep(0.5)
        started = time.monotonic()
        with pytest.raises(Overloaded, match="every schema compile worker stayed busy for 1s") as refused:
            workers.compile('{"type": "array"}', timeout=1.0)
        assert time.monotonic() - started < 3.0
        assert classify(refused.value)[0] == 429
        busy.join()
        assert workers.compile('{"type": "array"}', timeout=30)  # the pool serves again once the slow compile is killed
    finally:
        if busy.is_alive():
            busy.join()
        workers.close()


class SlowToDie:
    """A worker process that outlives its SIGKILL for seconds, as a niced one tearing down a large compile's memory
    did on a loaded machine (the soak's one unexplained 500: ``wait(5)`` after the kill timed out)."""

    def __init__(self, exits_after_s: float) -> None:
        self.exits_at, self.pid, self.args = None, 0, ["grammar-worker"]
        self.exits_after_s = exits_after_s

    def kill(self) -> None:
        self.exits_at = time.monotonic() + self.exits_after_s

    def poll(self) -> int | None:
        return -9 if self.exits_at is not None and time.monotonic() >= self.exits_at else None

    def wait(self, timeout: float | None = None) -> int:
        import subprocess

        while self.poll() is None:
            if timeout is not None and self.exits_at is not None and self.exits_at - time.monotonic() > timeout:
                time.sleep(timeout)
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.05)
        return -9


def test_a_timed_out_compile_is_a_422_even_when_its_worker_is_slow_to_exit() -> None:
    from multiprocessing.connection import Connection

    worker = _Worker("{}")
    ours, theirs = socket.socketpair()
    worker._process, worker._conn = SlowToDie(exits_after_s=8.0), Connection(ours.detach())  # a worker that never answers
    started = time.monotonic()
    with pytest.raises(CompileTimeout):  # the request's 422 (structured.py), not a TimeoutExpired's 500
        worker.compile('{"type": "object"}', timeout=0.2)
    assert time.monotonic() - started < 2.0  # not held until the process is gone
    theirs.close()
