"""Token buckets by key (a client address), in bounded memory.

The listener's per-address limits use them before any authentication runs: one bucket for
every request (`[http.rate_limit]`) and one that only failed authentications drain
(`[http.auth_failure_limit]`). Buckets of the least recently seen keys are dropped past
`max_clients`; a dropped key starts again with a full bucket, which errs on serving it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["TokenBuckets"]


class TokenBuckets:
    """`rate` tokens a second up to `burst` per key; `take` spends one, `wait` only looks."""

    def __init__(
        self,
        rate: float,
        burst: float,
        max_clients: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        # key -> (tokens, time of that count); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self.burst
        self._buckets.move_to_end(key)
        return min(self.burst, found[0] + (now - found[1]) * self.rate)

    def wait(self, key: str) -> float:
        """Seconds until `key` has a token (0.0: it has one now); spends nothing."""
        tokens = self._tokens(key, self._clock())
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def take(self, key: str) -> float:
        """Spend one of `key`'s tokens: 0.0 if there was one, else the wait for one."""
        now = self._clock()
        tokens = self._tokens(key, now)
        buckets = self._buckets
        if key not in buckets and len(buckets) >= self.max_clients:
            buckets.popitem(last=False)
        if tokens >= 1.0:
            buckets[key] = (tokens - 1.0, now)
            return 0.0
        buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate
