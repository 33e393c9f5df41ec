"""The disk and CPU tiers of the adapter cache, each bounded in bytes and evicted least recently used.

The disk tier keeps one folder per adapter version with a manifest of sizes and sha256 sums
(the model store's, reused); a folder whose files no longer match — truncated by a full disk,
corrupted, half-written — is dropped and fetched again, never loaded. Recency is the manifest's
mtime, so the order survives a restart. The CPU tier holds parsed adapters (float32 tensors,
pinned on cuda so copies to the device are asynchronous).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from lorafleet.model_store import MANIFEST, verify_manifest, write_manifest
from lorafleet.server.lora.adapter_format import LoraAdapter

log = logging.getLogger(__name__)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


class DiskCache:
    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.corrupt_dropped = 0
        self.evictions = 0
        self._lock = threading.Lock()
        self._used: int | None = None  # bytes on disk, as last counted (by evict); /metrics reads it without a walk

    def folder_for(self, key: str) -> Path:
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:40]

    def get(self, key: str) -> Path | None:
        """The verified folder for ``key``, or None (a corrupt copy is removed on the way)."""
        folder = self.folder_for(key)
        if not folder.is_dir():
            return None
        problem = verify_manifest(folder)
        if problem:
            log.warning("adapter %s: dropping its disk copy (%s); it will be fetched again", key, problem)
            shutil.rmtree(folder, ignore_errors=True)
            self.corrupt_dropped += 1
            return None
        os.utime(folder / MANIFEST)
        return folder

    def put(self, key: str, fetch: Callable[[Path], None], protect: set[str] = frozenset()) -> Path:
        """Fetch into a temporary folder, record its manifest, move it into place, then evict to the bound."""
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.folder_for(key)
        with tempfile.TemporaryDirectory(prefix=".fetch-", dir=self.root) as tmp:
            staging = Path(tmp) / "adapter"
            staging.mkdir()
            fetch(staging)
            write_manifest(staging)
            with self._lock:
                if target.exists():
                    shutil.rmtree(target)
                staging.rename(target)
        self.evict({self.folder_for(k) for k in protect} | {target})
        return target

    def evict(self, protect: set[Path]) -> None:
        with self._lock:
            folders = [f for f in self.root.iterdir() if f.is_dir() and not f.name.startswith(".")] if self.root.is_dir() else []
            sizes = {f: folder_bytes(f) for f in folders}
            total = sum(sizes.values())
            recency = sorted(folders, key=lambda f: (f / MANIFEST).stat().st_mtime if (f / MANIFEST).exists() else 0.0)
            for folder in recency:
                if total <= self.max_bytes:
                    break
                if folder in protect:
                    continue
                shutil.rmtree(folder, ignore_errors=True)
                total -= sizes[folder]
                self.evictions += 1
                log.info("adapter disk cache: evicted %s (%d bytes) to stay under %d", folder.name, sizes[folder], self.max_bytes)
            self._used = total

    def used_bytes(self) -> int:
        """As last counted: every put counts (its eviction pass sizes every folder); the first call counts once."""
        if self._used is None:
            if not self.root.is_dir():
                return 0
            self._used = sum(folder_bytes(f) for f in self.root.iterdir() if f.is_dir() and not f.name.startswith("."))
        return self._used


MERGED_PREFIX = "merged:"  # AdapterRef("merged", ...).key


class CpuCache:
    """Parsed adapters in CPU memory, least recently used evicted first. Merged adapters (recomputable from their
    spec, and as many as clients invent specs) hold at most ``merged_bytes`` of it: past that the oldest merged one
    goes, never a real adapter."""

    def __init__(self, max_bytes: int, merged_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.merged_bytes = max_bytes if merged_bytes is None else merged_bytes
        self.evictions = 0
        self._adapters: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> LoraAdapter | None:
        with self._lock:
            adapter = self._adapters.get(key)
            if adapter is not None:
                self._adapters.move_to_end(key)
            return adapter

    def put(self, key: str, adapter: LoraAdapter, protect: set[str] = frozenset()) -> None:
        with self._lock:
            self._adapters[key] = adapter
            self._adapters.move_to_end(key)
            if key.startswith(MERGED_PREFIX):
                self._evict([k for k in self._adapters if k.startswith(MERGED_PREFIX)], self.merged_bytes, protect | {key})
            self._evict(list(self._adapters), self.max_bytes, protect | {key})

    def _evict(self, candidates: list[str], limit: int, protect: set[str]) -> None:
        """Least recently used first among ``candidates`` (under the lock) until they hold at most ``limit`` bytes."""
        total = sum(self._adapters[k].size_bytes for k in candidates)
        for victim in candidates:
            if total <= limit:
                break
            if victim in protect:
                continue
            total -= self._adapters.pop(victim).size_bytes
            self.evictions += 1

    def drop(self, key: str) -> None:
        with self._lock:
            self._adapters.pop(key, None)

    def keys(self) -> list[str]:
        with self._lock:
            return list(self._adapters)

    def used_bytes(self) -> int:
        with self._lock:
            return sum(a.size_bytes for a in self._adapters.values())
