"""The CPU and disk tiers' byte bounds, evicted least recently used, with what is protected kept.

The engine tests run with the default bounds (4 GiB of CPU memory, 20 GiB of disk), which tiny adapters
never reach; here the bounds are a few adapters wide so eviction must act.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from types import SimpleNamespace

from lorafleet.server.adapters.cache import MANIFEST, CpuCache, DiskCache


def _adapter(size: int) -> SimpleNamespace:
    return SimpleNamespace(size_bytes=size)


def test_cpu_tier_evicts_least_recently_used_to_its_bound_and_keeps_protected() -> None:
    cache = CpuCache(max_bytes=250)
    cache.put("a", _adapter(100))
    cache.put("b", _adapter(100))
    assert cache.get("a") is not None  # a is now more recent than b
    cache.put("c", _adapter(100))
    assert cache.keys() == ["a", "c"] and cache.evictions == 1 and cache.used_bytes() == 200
    cache.put("d", _adapter(100), protect={"a"})  # c is older than d but a is protected: c goes
    assert cache.keys() == ["a", "d"] and cache.evictions == 2
    cache.put("big", _adapter(400))  # larger than the bound alone: everything else goes, it stays (it is being loaded)
    assert cache.keys() == ["big"] and cache.evictions == 4


def _fetch(size: int):
    def fetch(folder: Path) -> None:
        (folder / "adapter_model.safetensors").write_bytes(b"x" * size)
    return fetch


def test_disk_tier_evicts_least_recently_used_to_its_bound_and_drops_corrupt_copies(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "disk", max_bytes=2500)
    for key in ("a", "b"):
        cache.put(key, _fetch(1000))
        time.sleep(0.02)  # recency is the manifest's mtime
    assert cache.get("a") is not None  # touched: b is now the least recently used
    time.sleep(0.02)
    cache.put("c", _fetch(1000))
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert cache.evictions == 1 and cache.used_bytes() <= 2500 + 2 * 200  # two adapters, plus their manifests
    time.sleep(0.02)
    cache.put("d", _fetch(1000), protect={"a", "c"})  # over the bound, but both others protected: nothing goes
    assert all(cache.get(k) is not None for k in ("a", "c", "d")) and cache.evictions == 1
    # A copy whose bytes changed on disk is dropped on read and counted, never served.
    folder = cache.folder_for("d")
    (folder / "adapter_model.safetensors").write_bytes(b"y" * 1000)
    os.utime(folder / MANIFEST)
    assert cache.get("d") is None and cache.corrupt_dropped == 1 and not folder.exists()
