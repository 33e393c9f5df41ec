"""The operator's calls to replicas: list what is resident, load, unload. Async, bounded per replica.

One slow load (a large download from a slow hub) holds one of a replica's few call slots for as
long as it takes, never the operator's event loop or another replica's calls. Timeouts are sized
per call: a listing answers at once or the replica is in trouble; a load may wait for a download.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx

from lorafleet.adapter_ref import AdapterRef
from lorafleet.traffic_split import VersionCounts

LIST_TIMEOUT_S = 10.0
LOAD_TIMEOUT_S = 300.0  # the replica's own wait for a device slot is 300 s
UNLOAD_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 3.0
PERMANENT_LOAD_STATUSES = (400, 404, 422, 424)  # the adapter itself is wrong: retrying cannot help


@dataclass(frozen=True)
class LoadResult:
    ok: bool
    tier: str = ""
    digest: str | None = None  # of the weights the replica loaded
    permanent: bool = False
    message: str = ""
    unauthorized: bool = False  # 401: the admin token was refused (rotated, or read before it existed)


class ReplicaCalls:
    """HTTP calls to a fleet's replicas, at most ``per_replica`` at a time to each."""

    def __init__(self, per_replica: int) -> None:
        self.per_replica = per_replica
        self._limits: dict[str, asyncio.Semaphore] = {}
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(LOAD_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def close(self) -> None:
        await self._client.aclose()

    def _slot(self, url: str) -> asyncio.Semaphore:
        return self._limits.setdefault(url, asyncio.Semaphore(self.per_replica))

    async def resident(self, url: str) -> dict[str, str]:
        """``{adapter key: content digest}`` of what the replica holds on its device or in CPU memory, from its own listing.

        Keyed by the whole version (``AdapterRef.key``): an older revision of the same id is not the one asked for."""
        async with self._slot(url):
            response = await self._client.get(f"{url}/adapters", timeout=LIST_TIMEOUT_S)
        response.raise_for_status()
        listing: list[dict[str, Any]] = response.json()
        return {AdapterRef.from_entry(a).key: a.get("digest") for a in listing if a.get("tier") in ("device", "cpu")}

    async def load(self, url: str, request: dict[str, Any], headers: dict[str, str], started: Callable[[], None] | None = None) -> LoadResult:
        """``started``: called once the load holds one of the replica's call slots (it may wait behind others first)."""
        try:
            async with self._slot(url):
                if started is not None:
                    started()
                response = await self._client.post(f"{url}/adapters", json=request, headers=headers)
        except httpx.HTTPError as exc:
            return LoadResult(False, message=f"{type(exc).__name__}: {exc}".rstrip(": "))
        if response.status_code == 200:
            body = response.json()
            return LoadResult(True, tier=str(body.get("tier", "device")), digest=body.get("digest"))
        if response.status_code in PERMANENT_LOAD_STATUSES:
            return LoadResult(False, permanent=True, message=_error_text(response))
        return LoadResult(False, message=f"HTTP {response.status_code}: {_error_text(response)}", unauthorized=response.status_code == 401)

    async def put_catalogue(self, url: str, entries: list[dict[str, Any]], headers: dict[str, str]) -> bool:
        try:
            async with self._slot(url):
                response = await self._client.put(f"{url}/adapters/catalogue", json={"adapters": entries}, headers=headers, timeout=LIST_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def version_stats(self, url: str, versions: list[str], headers: dict[str, str]) -> dict[str, VersionCounts]:
        """The replica's counters for these versions (ring keys), as far as it has any (GET /adapters/stats)."""
        found: dict[str, VersionCounts] = {}
        for start in range(0, len(versions), 64):  # the route's limit per read
            async with self._slot(url):
                response = await self._client.get(f"{url}/adapters/stats", params=[("version", v) for v in versions[start:start + 64]],
                                                   headers=headers, timeout=LIST_TIMEOUT_S)
            response.raise_for_status()
            found.update({v: VersionCounts.from_wire(c) for v, c in (response.json().get("versions") or {}).items()})
        return found

    async def metrics(self, url: str) -> str | None:
        """The replica's /metrics exposition (the autoscaler's signals); None when it did not answer."""
        try:
            async with self._slot(url):
                response = await self._client.get(f"{url}/metrics", timeout=LIST_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    async def unload(self, url: str, adapter_id: str, headers: dict[str, str]) -> bool:
        """True once the replica no longer holds it (404 counts); False when it could not say."""
        try:
            async with self._slot(url):
                response = await self._client.delete(f"{url}/adapters/{quote(adapter_id, safe='/')}", headers=headers, timeout=UNLOAD_TIMEOUT_S)
        except httpx.HTTPError:
            return False
        return response.status_code in (200, 404, 409)  # 409: unpinned, serving; the replica evicts it when idle


def _error_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("error", body))[:300] if isinstance(body, dict) else str(body)[:300]
