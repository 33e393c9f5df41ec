"""The fleet loop wakes for an event wherever the handler that saw it runs (kopf runs sync handlers in threads)."""

from __future__ import annotations

import asyncio
import threading
import time

from support.waiting import wait_until

from lorafleet.operator.config import OperatorConfig
from lorafleet.operator.fleet import Fleet
from lorafleet.operator.handlers import Operator


class Stopped:
    def __init__(self) -> None:
        self.flag = False

    def __bool__(self) -> bool:
        return self.flag


def test_an_idle_fleet_loop_re_places_within_2s_of_a_wake_from_a_worker_thread() -> None:
    """Nothing else is happening on the loop (no watch traffic, no timer due for an hour): a wake from a kopf worker
    thread must still start a pass at once. ``Event.set()`` from that thread left the loop asleep."""
    fleet = Fleet("default", "m", io=None, residency_check_s=3600.0)
    passes: list[float] = []

    async def reconcile(records, pods, engine) -> None:
        passes.append(time.monotonic())

    fleet.reconcile = reconcile
    fleet._next_due = lambda: time.monotonic() + 3600.0
    operator = Operator(OperatorConfig(residency_check_s=3600.0), kube_factory=None)
    operator.fleets[("default", "m")] = fleet
    stopped = Stopped()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=lambda: loop.run_until_complete(fleet.run(list, list, dict, stopped)), daemon=True)
    thread.start()
    try:
        wait_until(lambda: len(passes) == 1, timeout=5, what="the first pass")
        time.sleep(0.3)  # the loop is asleep in its selector now
        woken = time.monotonic()
        operator.wake(("default", "m"))  # from this thread, as a sync kopf handler would
        wait_until(lambda: len(passes) == 2, timeout=2, what="a pass after the wake")
        assert passes[1] - woken < 2.0
    finally:
        stopped.flag = True
        operator.wake(("default", "m"))
        thread.join(10)
        loop.close()
    assert not thread.is_alive()
