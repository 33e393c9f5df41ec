"""One thread owns the replica's adapter state: listing, metrics, pins, loads and unloads racing generation for a while
give no 500 and no failed step, and the request counters are exact.

Found by reading (design review 3): GET /adapters walked the adapter states on the event loop while the engine thread
changed them, DELETE unpinned from the event loop while the engine iterated the pins between steps (a failed step
fails every request in flight), loader threads read the states unlocked, and event counters were bumped unlocked from
three threads. LORAFLEET_STRESS_S sets the length (20 s in the suite; the closing note reports a 60 s run).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from pathlib import Path

import httpx
import pytest
from support.metrics import metric_values
from support.server import RunningServer

from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.slow  # over ~5 s in process: kept out of `make test-fast`

NAMES = [f"s{i}" for i in range(5)]


@pytest.fixture(scope="module")
def adapter_root(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("stress-adapters")
    for i, name in enumerate(NAMES):
        make_lora_adapter(tiny_models["llama"], root / name, r=4, seed=60 + i)
    return root


async def test_admin_listing_and_metrics_racing_generation_break_nothing(tiny_models, adapter_root, tmp_path) -> None:
    seconds = float(os.environ.get("LORAFLEET_STRESS_S", "20"))
    # Two slots for five adapters: loads, evictions and rotations all the time; one pin at most.
    with RunningServer(tiny_models["llama"], adapter_root, tmp_path / "cache", max_concurrent_requests=64,
                       engine={"max_active_adapters": 2, "adapter_cycle_time_s": 0.2}) as server:
        statuses: Counter[tuple[str, int]] = Counter()
        generated = Counter()
        bodies: list[str] = []
        stop = asyncio.Event()
        rng = random.Random(7)

        async def loop(client: httpx.AsyncClient, what: str, call) -> None:  # noqa: ANN001
            while not stop.is_set():
                try:
                    response = await call(client)
                except httpx.TimeoutException as exc:  # a request that hangs is the worst outcome: name it
                    raise AssertionError(f"{what}: {exc.request.method} {exc.request.url} {exc.request.content[:200]!r} hung") from exc
                statuses[(what, response.status_code)] += 1
                if response.status_code not in (200, 404, 409):
                    bodies.append(f"{what} {response.request.method} {response.request.url.path}: {response.status_code} {response.text[:300]}")
                if what == "generate" and response.status_code == 200:
                    generated[response.headers["x-adapter-id"]] += 1

        def generate(client: httpx.AsyncClient):  # noqa: ANN202
            adapter = rng.choice([None, *NAMES])
            parameters = {"max_new_tokens": rng.randint(1, 6), **({"adapter_id": adapter} if adapter else {})}
            return client.post("/generate", json={"inputs": "Hello there", "parameters": parameters})

        def admin(client: httpx.AsyncClient):  # noqa: ANN202
            name = rng.choice(NAMES)
            if rng.random() < 0.5:
                return client.post("/adapters", json={"adapter_id": name, "pin": rng.random() < 0.3})
            return client.delete(f"/adapters/{name}")

        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            workers = [loop(client, "generate", generate) for _ in range(6)]
            workers += [loop(client, "list", lambda c: c.get("/adapters")), loop(client, "list", lambda c: c.get("/adapters?tier=device")),
                        loop(client, "metrics", lambda c: c.get("/metrics")), loop(client, "admin", admin), loop(client, "admin", admin)]
            tasks = [asyncio.ensure_future(w) for w in workers]
            await asyncio.sleep(seconds)
            stop.set()
            await asyncio.gather(*tasks)
            metrics = metric_values((await client.get("/metrics")).text)
        runner = server.service.runner
        assert not [k for k in statuses if k[1] >= 500], (statuses, bodies)
        assert {status for (what, status) in statuses if what in ("generate", "list", "metrics")} == {200}, (statuses, bodies)
        assert {status for (what, status) in statuses if what == "admin"} <= {200, 404, 409}, (statuses, bodies)  # 409: busy, or pins full
        assert runner.last_error is None and runner.consecutive_failures == 0
        served = sum(n for (what, status), n in statuses.items() if what == "generate")
        counted = sum(v for k, v in metrics.items() if k.startswith("lorafleet_requests_total{") and 'route="/generate",status="200"' in k)
        assert counted == served and served > 0  # exact: every request counted once
        assert sum(generated.values()) == served
