"""Optional bearer API keys from a file (one per line), re-read when the file changes. Keys are never logged."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from lorafleet.bearer import offered_one_of

log = logging.getLogger(__name__)


class ApiKeys:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._mtime: float | None = None
        self._keys: list[bytes] = []
        if path is not None:
            self._reload()

    def _reload(self) -> None:
        assert self.path is not None
        stat = os.stat(self.path)
        if stat.st_mtime == self._mtime:
            return
        lines = self.path.read_text().splitlines()
        self._keys = [line.strip().encode() for line in lines if line.strip() and not line.startswith("#")]
        self._mtime = stat.st_mtime
        log.info("loaded %d API keys from %s", len(self._keys), self.path)

    def allows(self, authorization: str | None) -> bool:
        if self.path is None:
            return True
        try:
            self._reload()
        except OSError as exc:  # a file being replaced: keep the keys we had
            log.warning("API key file unreadable (%s); keeping the previous keys", exc)
        return offered_one_of(authorization, self._keys)
