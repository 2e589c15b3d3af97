"""Token buckets for the `throttle` stage: how long a message must wait for its turn."""

from __future__ import annotations

import time

__all__ = ["TokenBuckets"]

_MAX_IDLE_KEYS = 10_000


class TokenBuckets:
    """`rate` tokens per `per` seconds per key, burst up to `rate`.

    `delay(key)` takes a token and returns how long to wait before using it. A token can be
    taken ahead of time (the balance goes negative), so concurrent waiters queue up fairly
    instead of all waking at once when one token returns.
    """

    __slots__ = ("_buckets", "_capacity", "_clock", "_refill")

    def __init__(self, rate: int, per: float, clock: object = time.monotonic) -> None:
        self._capacity = float(rate)
        self._refill = rate / per
        self._buckets: dict[object, tuple[float, float]] = {}
        self._clock = clock

    def delay(self, key: object) -> float:
        """Seconds the caller must wait before its message may pass (0.0 if at once)."""
        now: float = self._clock()  # type: ignore[operator]
        tokens, last = self._buckets.get(key, (self._capacity, now))
        tokens = min(self._capacity, tokens + (now - last) * self._refill) - 1.0
        if len(self._buckets) >= _MAX_IDLE_KEYS and key not in self._buckets:
            self._forget_full(now)
        self._buckets[key] = (tokens, now)
        return 0.0 if tokens >= 0 else -tokens / self._refill

    def _forget_full(self, now: float) -> None:
        """Drop keys whose bucket has refilled: they behave exactly like unseen keys."""
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self._refill >= self._capacity:
                del self._buckets[key]
