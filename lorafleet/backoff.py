"""One back-off for every retry in the fleet: a replica's failed adapter fetches, the operator's calls and checks, the
gateway's ejections. Exponential from ``first_s``, capped at ``max_s``; ``first_s == max_s`` is a flat retry."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Backoff:
    first_s: float
    max_s: float
    factor: float = 2.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retrying after failure number ``attempt`` (1-based)."""
        return min(self.max_s, self.first_s * self.factor ** max(0, attempt - 1))
