"""Polling for a condition in tests that drive background processes, servers and operators."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], object], timeout: float = 30.0, what: str = "condition", interval: float = 0.05) -> float:
    """Poll until ``predicate()`` is truthy and return the seconds it took; an exception counts as not yet."""
    start = time.monotonic()
    last: BaseException | None = None
    while time.monotonic() - start < timeout:
        try:
            if predicate():
                return time.monotonic() - start
        except Exception as exc:  # the object, process or route may not exist yet
            last = exc
        time.sleep(interval)
    raise AssertionError(f"{what} not reached in {timeout}s" + (f" (last error: {last!r})" if last else ""))
