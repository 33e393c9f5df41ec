"""A loop of the operator that other threads may wake: the fleets, the tenant policies, the autoscalers."""

from __future__ import annotations

import asyncio


class Wakeable:
    """``wake`` is set on the loop only; ``run`` binds the loop (``self._loop = asyncio.get_running_loop()``)."""

    def __init__(self) -> None:
        self.wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def wake_up(self) -> None:
        """Ask for a pass, from any thread. ``asyncio.Event.set`` from another thread schedules the waiter without
        waking the loop's selector: an idle operator then re-placed only when other I/O or its next timer woke it
        (up to ``residency_check_s``). ``call_soon_threadsafe`` wakes it."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self.wake.set)
