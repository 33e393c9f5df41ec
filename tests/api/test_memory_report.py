"""The bytes a replica spends, by what holds them, in /info and /metrics (issue 35)."""

from __future__ import annotations

import httpx
import pytest
from support.metrics import metric_values
from support.server import RunningServer

from lorafleet.testing import make_lora_adapter

pytestmark = pytest.mark.slow  # a real replica with the tiny model


def test_memory_is_reported_by_holder_and_follows_what_the_replica_loads(tiny_models, tmp_path) -> None:
    make_lora_adapter(tiny_models["llama"], tmp_path / "adapters" / "m0", r=4, seed=1)
    with RunningServer(tiny_models["llama"], tmp_path / "adapters", tmp_path / "cache", engine={"max_active_adapters": 3}) as replica:
        info = httpx.get(replica.url + "/info", timeout=30).json()
        memory = info["memory"]
        assert memory["base_weights"] == info["model_bytes"] > 0 and memory["kv_cache_allocated"] == info["kv_cache_bytes"] > 0
        assert memory["adapter_slots_allocated"] == 0 and memory["cpu_tier"] == 0  # slots are made on the first adapter load
        response = httpx.post(replica.url + "/generate", json={"inputs": "hi", "parameters": {"adapter_id": "m0", "adapter_source": "local",
                                                                                           "max_new_tokens": 2}}, timeout=60)
        assert response.status_code == 200
        after = httpx.get(replica.url + "/info", timeout=30).json()["memory"]
        assert after["adapter_slots_allocated"] == 3 * after["adapter_slots_used"] > 0  # three slots made, one taken
        assert after["cpu_tier"] > 0 and after["disk_tier"] >= 0 and 0 <= after["kv_cache_used"] <= after["kv_cache_allocated"]
        values = metric_values(httpx.get(replica.url + "/metrics", timeout=30).text)
    for kind, size in after.items():
        if kind != "kv_cache_used":  # the one that moves between the two reads
            assert values[f'lorafleet_memory_bytes{{kind="{kind}"}}'] == size
