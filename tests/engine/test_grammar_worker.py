"""Schema compile workers run below the engine's priority from their first instruction on: a hostile schema stream
restarts them often (every timed-out compile kills one), and each start imports xgrammar and torch (~3 s of CPU)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from support.engine import make_engine

from lorafleet.server.background import NICENESS
from lorafleet.server.engine.grammar_worker import _Worker

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`


def nice_and_cpu_seconds(pid: int) -> tuple[int, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd (state) on: the name may hold spaces
    return int(fields[16]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_starting_compile_worker_never_runs_at_the_engines_priority(tiny_models: dict[str, Path]) -> None:
    info = make_engine(tiny_models["llama"]).grammar()._info.serialize_json()
    worker = _Worker(info)
    starting = threading.Thread(target=worker._start)
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
