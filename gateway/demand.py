"""Scale from zero, the gateway's half: hold a request while no replica is ready, and say there is demand.

A fleet the autoscaler took to zero has no replica to report demand, so the gateway does: the first request that
finds no ready replica stamps the BaseModel's ``lorafleet.io/demand-at`` annotation (at most every STAMP_EVERY_S),
and the operator, watching BaseModels, scales to one at once (operator/autoscale_loop.py). Meanwhile the request
waits here, up to ``--hold-at-zero-s``, and at most ``--hold-queue`` requests wait at a time; past either bound it
gets a 503 with Retry-After. The patch needs the gateway's Role to allow ``patch`` on that one BaseModel (the
operator grants it, by name).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime

from lorafleet.gateway.discovery import load_kube_config

log = logging.getLogger(__name__)
ANNOTATION = "lorafleet.io/demand-at"
STAMP_EVERY_S = 5.0


class DemandStamp:
    def __init__(self, basemodel: str | None) -> None:
        self.namespace, _, self.name = (basemodel or "").partition("/")
        self._last = 0.0
        self._api = None

    def _patch(self, stamp: str) -> None:
        from kubernetes import client

        if self._api is None:
            load_kube_config()
            self._api = client.CustomObjectsApi()
        self._api.patch_namespaced_custom_object("lorafleet.io", "v1alpha1", self.namespace, "basemodels", self.name,
                                                 {"metadata": {"annotations": {ANNOTATION: stamp}}})

    async def stamp(self) -> None:
        """Tell the operator (from a thread: the client blocks); a failure is logged, the request still waits."""
        if not self.name or time.monotonic() - self._last < STAMP_EVERY_S:
            return
        self._last = time.monotonic()
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        try:
            await asyncio.to_thread(self._patch, stamp)
        except Exception as exc:  # noqa: BLE001 - RBAC, the API restarting: the autoscaler's own tick still sees the gateway's 503s
            log.warning("could not stamp demand on BaseModel %s/%s: %s", self.namespace, self.name, exc)
