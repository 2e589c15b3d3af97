"""Per-client rate limiting: one token bucket per client key, in bounded memory.

    [sources.rate_limit]
    rate = 50        # requests per second, sustained, per client
    burst = 100      # requests a client may send at once after being idle

A client is its API key id, its JWT subject, or (unauthenticated) its IP address, so one noisy
partner cannot starve the others. A request takes one token; an empty bucket answers 429 with
`Retry-After` saying when the next token is there. Buckets of the least recently seen clients
are dropped past `max_clients`: a dropped client starts again with a full bucket, which errs on
the side of serving it.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

import msgspec

__all__ = ["RateLimitConfig", "RateLimiter"]


class RateLimitConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Token bucket parameters, the same for every client of one source."""

    rate: float
    """Requests per second each client may send, sustained (over 0; fractions allowed)."""
    burst: int | None = None
    """Requests a client may send at once after being idle (default: `rate` rounded up)."""
    max_clients: int = 10_000
    """Clients whose buckets are remembered; past it the least recently seen one is dropped
    and starts again with a full bucket."""

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError("rate_limit.rate must be > 0 requests per second")
        if self.burst is not None and self.burst < 1:
            raise ValueError("rate_limit.burst must be at least 1")
        if self.max_clients < 1:
            raise ValueError("rate_limit.max_clients must be at least 1")


class RateLimiter:
    """Token buckets by client key; `take(key)` is 0.0 when allowed, else seconds to wait."""

    def __init__(
        self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = config.rate
        self.burst = float(
            config.burst if config.burst is not None else max(1, math.ceil(config.rate))
        )
        self.max_clients = config.max_clients
        self._clock = clock
        # key -> (tokens, time of that count); most recently used last.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> float:
        """Take one token of `key`'s bucket: 0.0 if there was one, else the wait for one."""
        now = self._clock()
        buckets = self._buckets
        found = buckets.get(key)
        if found is None:
            tokens = self.burst
            if len(buckets) >= self.max_clients:
                buckets.popitem(last=False)
        else:
            tokens = min(self.burst, found[0] + (now - found[1]) * self.rate)
            buckets.move_to_end(key)
        if tokens >= 1.0:
            buckets[key] = (tokens - 1.0, now)
            return 0.0
        buckets[key] = (tokens, now)
        return (1.0 - tokens) / self.rate
