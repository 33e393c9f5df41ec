"""Work a client can ask for in bulk (schema compiles, adapter merges) runs below the engine's priority.

On a replica's few cores, a stream of hostile schemas or merges otherwise takes CPU from every request's steps
(the third adversarial soak: normal clients' p99 nearly 3x with eight attackers). Niced, that work gets only
what the engine leaves; its own budgets (compile timeout, merge cost bound) still end it.
"""

from __future__ import annotations

import os
import threading

NICENESS = 19  # the lowest: a weight of 15 against the engine's 1024 (10, tried first, left normal clients at 2.4-2.7x p99 under attack)


def lower_this_threads_priority() -> None:
    """Nice the calling thread (Linux: a thread's priority is its own; threads it starts, torch's included,
    inherit it)."""
    lower_thread_priority(threading.get_native_id())


def lower_thread_priority(native_id: int | None) -> None:
    """Nice one thread by its kernel id (a thread that finished meanwhile is no error)."""
    try:
        os.setpriority(os.PRIO_PROCESS, native_id, NICENESS)
    except (AttributeError, OSError, TypeError):  # another OS, not permitted, or gone: it runs as it was
        pass
