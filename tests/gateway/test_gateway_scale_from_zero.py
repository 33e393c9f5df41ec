"""Scale from zero at the gateway: a request that finds no replica waits for one (bounded), then 503 with Retry-After."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from support.upstream import Gateway, Upstream
from support.waiting import wait_until

from lorafleet.gateway.discovery import static_members

pytestmark = pytest.mark.e2e

BODY = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}


def members(gateway: Gateway, urls: list[str]) -> None:
    """What discovery does when the Service's ready endpoints change (none at zero replicas)."""
    app = gateway.server.config.app
    app.loop.call_soon_threadsafe(app.replicas.update, static_members(urls))


def test_a_request_at_zero_waits_for_the_first_replica_and_is_answered() -> None:
    with Upstream() as upstream, Gateway([upstream], hold_at_zero_s=10) as gateway:
        members(gateway, [])
        wait_until(lambda: httpx.get(gateway.url + "/replicas").json()["replicas"] == [], timeout=5, what="no members")
        answered: list[tuple[int, float]] = []
        started = time.monotonic()
        waiting = threading.Thread(target=lambda: answered.append((httpx.post(gateway.url + "/generate", json=BODY, timeout=30).status_code,
                                                                   time.monotonic() - started)))
        waiting.start()
        time.sleep(1.0)
        assert not answered  # held, not refused
        members(gateway, [upstream.url])  # the first replica is Ready
        waiting.join(10)
        assert answered and answered[0][0] == 200 and 1.0 <= answered[0][1] < 3.0
        assert 'lorafleet_gateway_cold_start_waits_total{outcome="served"} 1.0' in httpx.get(gateway.url + "/metrics").text


def test_past_the_hold_or_the_queue_a_request_gets_503_with_retry_after() -> None:
    with Upstream() as upstream, Gateway([upstream], hold_at_zero_s=1.0, hold_queue=1) as gateway:
        members(gateway, [])
        wait_until(lambda: httpx.get(gateway.url + "/replicas").json()["replicas"] == [], timeout=5, what="no members")
        results: list[tuple[int, str | None, float]] = []

        def ask() -> None:
            started = time.monotonic()
            response = httpx.post(gateway.url + "/generate", json=BODY, timeout=30)
            results.append((response.status_code, response.headers.get("retry-after"), time.monotonic() - started))

        threads = [threading.Thread(target=ask) for _ in range(2)]
        for thread in threads:
            thread.start()
            time.sleep(0.2)
        for thread in threads:
            thread.join(10)
    statuses = sorted(results, key=lambda r: r[2])
    assert [r[0] for r in statuses] == [503, 503] and all(r[1] == "10" for r in statuses)
    assert statuses[0][2] < 0.5 and 0.9 <= statuses[1][2] < 2.5  # the second waiter overflowed at once; the first held 1 s


def test_without_a_hold_a_request_at_zero_is_refused_at_once() -> None:
    with Upstream() as upstream, Gateway([upstream]) as gateway:
        members(gateway, [])
        wait_until(lambda: httpx.get(gateway.url + "/replicas").json()["replicas"] == [], timeout=5, what="no members")
        started = time.monotonic()
        response = httpx.post(gateway.url + "/generate", json=BODY, timeout=30)
        assert response.status_code == 503 and "retry-after" not in response.headers and time.monotonic() - started < 0.5
