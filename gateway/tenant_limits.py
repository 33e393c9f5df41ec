"""One tenant at one gateway: what it may call and how much of its limits it has spent.

Requests per minute are taken before a request starts (a token bucket a minute deep). Tokens cannot be: a request's
prompt and generated tokens are known only from the answer, so tokens per minute and per day are charged afterwards
and a request is admitted while the tenant still has credit. A tenant can therefore overshoot a token limit by what its
requests in flight at the moment it ran out go on to use (at most ``concurrentRequests`` answers; LiteLLM's proxy
counts the same way); the next request then waits until the debt is repaid. The day is the UTC day; its spend lives in
the gateway's memory, so a restarted gateway starts the day afresh (stated in the README).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from lorafleet.token_bucket import TokenBucket

DAY_S = 86400


@dataclass
class Limits:
    """A tenant's limits as this gateway enforces them (already divided by the gateways sharing them); None: unlimited."""
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    concurrent: int | None = None
    tokens_per_day: float | None = None

    @classmethod
    def from_policy(cls, limits: dict, gateways: int) -> Limits:
        def share(key: str) -> float | None:
            value = limits.get(key)
            return None if value is None else float(value) / gateways

        concurrent = limits.get("concurrentRequests")
        return cls(share("requestsPerMinute"), share("tokensPerMinute"),
                   None if concurrent is None else max(1, math.ceil(int(concurrent) / gateways)), share("tokensPerDay"))


@dataclass
class DailyBudget:
    """Tokens spent in the current UTC day, against a budget."""
    budget: float
    spent: float = 0.0
    day: int = -1

    def _roll(self, wall: float) -> None:
        if (today := int(wall // DAY_S)) != self.day:
            self.day, self.spent = today, 0.0

    def charge(self, amount: float, wall: float) -> None:
        self._roll(wall)
        self.spent += amount

    def wait(self, wall: float) -> float:
        """0 while under budget; else seconds until the next UTC midnight."""
        self._roll(wall)
        return 0.0 if self.spent < self.budget else (self.day + 1) * DAY_S - wall


@dataclass
class Tenant:
    name: str
    adapters: frozenset[str]
    base: bool
    limits: Limits = field(default_factory=Limits)
    shared_cache: bool = False  # its requests use the fleet's shared prefix-cache salt (its prompts are not secret)
    in_flight: int = 0
    requests: TokenBucket | None = field(default=None, repr=False)
    tokens: TokenBucket | None = field(default=None, repr=False)
    daily: DailyBudget | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        rpm, tpm, day = self.limits.requests_per_minute, self.limits.tokens_per_minute, self.limits.tokens_per_day
        if rpm is not None and self.requests is None:
            self.requests = TokenBucket(rpm / 60.0, max(1.0, rpm))
        if tpm is not None and self.tokens is None:
            self.tokens = TokenBucket(tpm / 60.0, max(1.0, tpm))
        if day is not None and self.daily is None:
            self.daily = DailyBudget(day)

    def may_call(self, adapters: list[str] | None, shared: frozenset[str]) -> bool:
        """``adapters``: the registered names a request asks for (None: the base model)."""
        if adapters is None:
            return self.base
        return all(a in self.adapters or a in shared for a in adapters)

    def admit(self, now: float, wall: float | None = None) -> tuple[str, float] | None:
        """None when the request may start (it is counted in flight); else (the limit it is over, seconds until it fits).
        The token limits are checked before the request bucket is taken from, so a refused request spends nothing."""
        wall = time.time() if wall is None else wall
        limits = self.limits
        if limits.concurrent is not None and self.in_flight >= limits.concurrent:
            return f"concurrentRequests {limits.concurrent}", 1.0
        if self.daily is not None and (wait := self.daily.wait(wall)):
            return f"tokensPerDay {limits.tokens_per_day:g}", wait
        if self.tokens is not None and (wait := self.tokens.credit_wait(now)):
            return f"tokensPerMinute {limits.tokens_per_minute:g}", wait
        if self.requests is not None and (wait := self.requests.take(now)):
            return f"requestsPerMinute {limits.requests_per_minute:g}", wait
        self.in_flight += 1
        return None

    def charge(self, tokens: int, now: float, wall: float | None = None) -> None:
        """Count tokens an answer used against the token limits (prompt tokens when it starts, generated as stated)."""
        if self.tokens is not None:
            self.tokens.charge(tokens, now)
        if self.daily is not None:
            self.daily.charge(tokens, time.time() if wall is None else wall)

    def done(self) -> None:
        self.in_flight -= 1

    def continue_from(self, old: Tenant) -> None:
        """A policy reload (a rotated key, a changed limit) keeps what is in flight and what was spent."""
        self.in_flight = old.in_flight
        for mine, theirs in ((self.requests, old.requests), (self.tokens, old.tokens)):
            if mine is not None and theirs is not None:
                mine.continue_from(theirs)
        if self.daily is not None and old.daily is not None:
            self.daily.spent, self.daily.day = old.daily.spent, old.daily.day
