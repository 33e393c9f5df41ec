"""A token bucket: a rate with bursts, shared by the replica's warm budget and the gateway's tenant limits. Torch-free."""

from __future__ import annotations

import time


class TokenBucket:
    """``rate`` takes a second with bursts of ``burst``; ``take`` answers how long to wait (0: taken). It starts full
    at its first ``take``; ``now`` (monotonic seconds) is for callers that already read the clock, and for tests."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = float(burst), None

    def take(self, now: float | None = None) -> float:
        self._refill(now)
        if self._tokens >= 1:
            self._tokens -= 1
            return 0.0
        return (1 - self._tokens) / self.rate

    def _refill(self, now: float | None) -> float:
        now = time.monotonic() if now is None else now
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return now

    def charge(self, amount: float, now: float | None = None) -> None:
        """Spend ``amount`` known only afterwards (an answer's tokens): the bucket may go into debt, and ``credit_wait``
        keeps the next caller out until it is repaid."""
        self._refill(now)
        self._tokens -= amount

    def credit_wait(self, now: float | None = None) -> float:
        """0 while the bucket holds at least one unit of credit; else seconds until it does again."""
        self._refill(now)
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def continue_from(self, previous: TokenBucket) -> None:
        """Keep what ``previous`` had spent (a policy reload), under this bucket's own rate and burst."""
        self._tokens, self._at = min(self.burst, previous._tokens), previous._at
