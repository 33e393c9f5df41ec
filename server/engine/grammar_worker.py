"""Schema compiles in processes that can be killed, so a hostile schema costs its own request and nothing else.

xgrammar compiles a JSON schema against the whole vocabulary; some small schemas take minutes (``(.{1,40}){1,40}``
as a string pattern: over 100 s here), and a compile running on a thread cannot be stopped: a timed-out compile kept
the one compile thread busy and every other client's schema failed after 10 s. Here each compile runs in one of a
few worker processes that hold a compiler for the replica's vocabulary; a compile past its budget gets its worker
killed (a new one starts on the next use) and the request a 422. The compiled grammar comes back serialised.
The child imports xgrammar only: no torch, no model.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection

from lorafleet.server.background import NICENESS
from lorafleet.server.errors import Overloaded

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0  # a new worker imports xgrammar and reads the vocabulary: a second or two, far less than this


def serve(conn: Connection, nice_first: bool) -> None:  # pragma: no cover - runs in the child process
    """The child: a compiler for the vocabulary it is sent first, then one schema in, one answer out, until EOF.

    Importing xgrammar (and torch with it) is ~3 s of CPU. A restart (a timed-out compile killed the worker: a hostile
    schema stream makes many) does it niced from the first instruction; restarts that niced only after it ran at the
    engine's priority (the soak's slow-schema attackers: normal clients' p99 2.75x). The pool's first start is not
    niced, so the replica's first schema does not wait for it on a busy machine."""
    if nice_first:
        os.nice(NICENESS)
    import xgrammar as xgr

    if not nice_first:
        os.nice(NICENESS)

    compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(conn.recv()), cache_enabled=False)
    conn.send(("ready", ""))
    while True:
        try:
            schema = conn.recv()
        except EOFError:
            return
        try:
            answer = ("ok", compiler.compile_json_schema(schema, any_whitespace=False).serialize_json())
        except Exception as exc:  # xgrammar reports schema errors as RuntimeError
            answer = ("error", str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
        try:
            conn.send(answer)
        except OSError:  # the replica went away (killed) while this compiled: nobody to answer, nothing to log
            return


class CompileTimeout(TimeoutError):
    """The schema did not compile within its budget; its worker was killed."""


class _Worker:
    def __init__(self, tokenizer_info_json: str) -> None:
        self._info = tokenizer_info_json
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None

    def _start(self, nice_first: bool = True) -> None:
        """A fresh interpreter (never a fork of one that holds torch's threads, nor a re-run of whatever __main__ is)."""
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet.server.engine.grammar_worker", str(theirs.fileno()),
                                              "nice-first" if nice_first else "nice-after-import"],
                                             pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self._conn = Connection(ours.detach())
        self._conn.send(self._info)
        if not self._conn.poll(START_TIMEOUT_S) or self._conn.recv()[0] != "ready":
            self.kill()
            raise RuntimeError("the grammar worker process did not start")

    @property
    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def ensure_started(self, nice_first: bool = True) -> None:
        if not self.alive:
            self.kill()
            self._start(nice_first)

    def compile(self, schema: str, timeout: float) -> str:
        """The serialised compiled grammar; ValueError for a schema xgrammar refuses; CompileTimeout past ``timeout``."""
        self.ensure_started()
        assert self._conn is not None
        try:
            self._conn.send(schema)
            answered = self._conn.poll(timeout)
            status, payload = self._conn.recv() if answered else ("", "")
        except (EOFError, OSError) as exc:  # the worker died under it (killed from outside, out of memory)
            self.kill()
            raise RuntimeError(f"the grammar worker process died: {exc}") from exc
        if not answered:
            self.kill()
            raise CompileTimeout(f"did not compile within {timeout:g}s")
        if status == "error":
            raise ValueError(payload)
        return payload

    def kill(self) -> None:
        """SIGKILL, reaped in the background if it does not go at once: a niced worker holding a large compile's
        memory took over 5 s to exit on a loaded machine, and waiting for it here turned the request's 422 into a 500."""
        if self._process is not None:
            process = self._process
            process.kill()
            try:
                process.wait(0.5)
            except subprocess.TimeoutExpired:
                threading.Thread(target=process.wait, name="lorafleet-grammar-reap", daemon=True).start()
        if self._conn is not None:
            self._conn.close()
        self._process, self._conn = None, None


class GrammarWorkers:
    """A few worker processes; a compile waits for a free one. Only started workers are free: each starts in the
    background when the pool is made, and again right after a kill, so the compile after a hostile one never waits
    for a process to start."""

    def __init__(self, tokenizer_info_json: str, workers: int) -> None:
        self._workers = [_Worker(tokenizer_info_json) for _ in range(workers)]
        self._closed = False
        self._free: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._busy = 0  # workers compiling now (not starting)
        self._busy_lock = threading.Lock()
        for worker in self._workers:
            self._restart(worker, nice_first=False)

    def _restart(self, worker: _Worker, nice_first: bool = True) -> None:
        def start() -> None:
            try:
                if not self._closed:
                    worker.ensure_started(nice_first)
                    if self._closed:  # closed while it started: no process outlives the pool
                        worker.kill()
            except Exception as exc:  # it tries again when next used; the request then sees the error
                log.warning("grammar worker did not start: %s", exc)
            self._free.put(worker)

        threading.Thread(target=start, name="lorafleet-grammar-start", daemon=True).start()

    def compile(self, schema: str, timeout: float) -> str:
        """Waits at most ``timeout`` for a free worker (Overloaded past it: under a stream of hostile schemas the queue
        held requests over 30 s with no answer), then compiles within ``timeout`` of its own (a schema is never judged
        slow for the time it waited)."""
        budget_ends = time.monotonic() + timeout
        while True:
            try:
                worker = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                now = time.monotonic()  # past the budget, it waits on only while workers start (none compiles), for a start's time
                if now >= budget_ends + START_TIMEOUT_S or (now >= budget_ends and self._busy > 0):
                    raise Overloaded(f"every schema compile worker stayed busy for {timeout:g}s; try again shortly") from None
        with self._busy_lock:
            self._busy += 1
        try:
            return worker.compile(schema, timeout)
        finally:
            with self._busy_lock:
                self._busy -= 1
            if worker.alive:
                self._free.put(worker)
            else:
                self._restart(worker)

    def close(self) -> None:
        self._closed = True
        for worker in self._workers:
            worker.kill()

if __name__ == "__main__":  # pragma: no cover - the child's entry: python -m lorafleet.server.engine.grammar_worker FD
    serve(Connection(int(sys.argv[1])), sys.argv[2] == "nice-first")
