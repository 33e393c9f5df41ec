"""Schema compiles in processes that can be killed, so a hostile schema costs its own request and nothing else.

xgrammar compiles a JSON schema against the whole vocabulary; some small schemas take minutes (``(.{1,40}){1,40}``
as a string pattern: over 100 s here), and a compile running on a thread cannot be stopped: a timed-out compile kept
the one compile thread busy and every other client's schema failed after 10 s. Here each compile runs in one of a
few worker processes that hold a compiler for the replica's vocabulary; a compile past its budget gets its worker
killed (a new one starts on the next use) and the request a 422. The compiled grammar comes back serialised.

Workers are forked from a zygote process that imported xgrammar once: a hostile schema stream kills a worker per
schema, and a worker started from scratch imports xgrammar and torch with it (~3.5 s of CPU each, on a replica's few
cores); a fork of the zygote is ready in a fraction of that.
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from lorafleet.server.background import NICENESS
from lorafleet.server.errors import Overloaded

log = logging.getLogger(__name__)
START_TIMEOUT_S = 60.0  # a new worker imports xgrammar and reads the vocabulary: a second or two, far less than this


def _compile_loop(conn: Connection, compiler: Any) -> None:  # pragma: no cover - runs in a worker process
    """One schema in, one answer out, until EOF."""
    while True:
        try:
            schema = conn.recv()
        except (EOFError, OSError):
            return
        try:
            answer = ("ok", compiler.compile_json_schema(schema, any_whitespace=False).serialize_json())
        except Exception as exc:  # xgrammar reports schema errors as RuntimeError
            answer = ("error", str(exc).splitlines()[-1] if str(exc) else type(exc).__name__)
        try:
            conn.send(answer)
        except OSError:  # the replica went away (killed) while this compiled: nobody to answer, nothing to log
            return


def zygote(control: socket.socket) -> None:  # pragma: no cover - runs in the zygote process
    """Imports xgrammar (torch with it) once, niced after it so the replica's first schema does not wait for a niced
    import on a busy machine, then forks one worker per socket the replica sends and answers with its pid. Workers
    inherit the niceness, and build their compiler after the fork (xgrammar's compiler starts threads, which a fork
    must not inherit). The kernel reaps them (SIGCHLD ignored); the zygote ends when the replica closes its end."""
    import xgrammar as xgr

    os.nice(NICENESS)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    conn = Connection(os.dup(control.fileno()))
    info = conn.recv()
    conn.send(("ready", ""))
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return
        if not fds:  # EOF: the replica closed its end, or died
            return
        pid = os.fork()
        if pid == 0:
            try:
                control.close()
                conn.close()
                worker = Connection(fds[0])
                compiler = xgr.GrammarCompiler(xgr.TokenizerInfo.deserialize_json(info), cache_enabled=False)
                worker.send(("ready", ""))
                _compile_loop(worker, compiler)
            finally:
                os._exit(0)
        os.close(fds[0])
        conn.send(pid)


class CompileTimeout(TimeoutError):
    """The schema did not compile within its budget; its worker was killed."""


class _Zygote:
    """The replica's end of the zygote: started on first use (and again if it died), one fork at a time."""

    def __init__(self, tokenizer_info_json: str) -> None:
        self._info = tokenizer_info_json
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._control: socket.socket | None = None
        self._conn: Connection | None = None
        self._closed = False

    def _start(self) -> None:
        """A fresh interpreter (never a fork of the replica, which holds torch's threads, nor a re-run of __main__)."""
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen([sys.executable, "-P", "-m", "lorafleet.server.engine.grammar_worker", str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        self._control, self._conn = ours, Connection(os.dup(ours.fileno()))
        self._conn.send(self._info)
        if not _said_ready(self._conn):
            self._close()
            raise RuntimeError("the grammar compile zygote did not start")

    def fork(self) -> tuple[int, Connection]:
        """A new worker: its pid, and the replica's end of its connection."""
        with self._lock:
            if self._closed:  # the pool closed while a worker was to start: no process outlives it
                raise RuntimeError("the grammar compile pool is closed")
            if self._process is None or self._process.poll() is not None:
                self._close()
                self._start()
            assert self._control is not None and self._conn is not None
            ours, theirs = socket.socketpair()
            try:
                with theirs:
                    socket.send_fds(self._control, [b"w"], [theirs.fileno()])
                if not self._conn.poll(START_TIMEOUT_S):
                    raise RuntimeError("the grammar compile zygote did not fork a worker")
                pid = self._conn.recv()
            except BaseException:
                ours.close()
                self._close()  # started afresh on the next fork
                raise
            return pid, Connection(ours.detach())

    def _close(self) -> None:
        for closable in (self._conn, self._control):
            if closable is not None:
                closable.close()
        if self._process is not None:
            _kill_and_reap(self._process)
        self._process, self._control, self._conn = None, None, None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._close()


def _kill_and_reap(process: subprocess.Popen) -> None:
    """SIGKILL, reaped in the background if it does not go at once: a niced process tearing down a large compile's
    memory took over 5 s to exit on a loaded machine, and waiting for it turned a request's 422 into a 500."""
    process.kill()
    try:
        process.wait(0.5)
    except subprocess.TimeoutExpired:
        threading.Thread(target=process.wait, name="lorafleet-grammar-reap", daemon=True).start()


def _said_ready(conn: Connection) -> bool:
    """Whether a started zygote or worker answered "ready" within START_TIMEOUT_S."""
    return conn.poll(START_TIMEOUT_S) and conn.recv()[0] == "ready"


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Worker:
    def __init__(self, zygote: _Zygote) -> None:
        self._zygote = zygote
        self._pid: int | None = None
        self._conn: Connection | None = None

    def _start(self) -> None:
        self._pid, self._conn = self._zygote.fork()
        if not _said_ready(self._conn):
            self.kill()
            raise RuntimeError("the grammar worker process did not start")

    @property
    def alive(self) -> bool:
        return self._pid is not None and _exists(self._pid)

    def ensure_started(self) -> None:
        if not self.alive:
            self.kill()
            self._start()

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
        """SIGKILL; the zygote's kernel reaps it, so nothing here waits for it to go."""
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self._conn is not None:
            self._conn.close()
        self._pid, self._conn = None, None


class GrammarWorkers:
    """A few worker processes; a compile waits for a free one. Only started workers are free: each starts in the
    background when the pool is made, and again right after a kill, so the compile after a hostile one never waits
    for a process to start."""

    def __init__(self, tokenizer_info_json: str, workers: int) -> None:
        self._zygote = _Zygote(tokenizer_info_json)
        self._workers = [_Worker(self._zygote) for _ in range(workers)]
        self._closed = False
        self._free: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._busy = 0  # workers compiling now (not starting)
        self._busy_lock = threading.Lock()
        for worker in self._workers:
            self._restart(worker)

    def _restart(self, worker: _Worker) -> None:
        def start() -> None:
            try:
                if not self._closed:
                    worker.ensure_started()
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
        self._zygote.close()

if __name__ == "__main__":  # pragma: no cover - the zygote's entry: python -m lorafleet.server.engine.grammar_worker FD
    zygote(socket.socket(fileno=int(sys.argv[1])))
