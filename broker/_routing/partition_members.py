"""Which daemons run a partitioned route now: a heartbeat key per daemon in the state bucket.

Each daemon running the route rewrites `=members.<route>.<holder>` every `ttl / 4` with a
growing beat count. Another daemon counts it alive while the value keeps changing, timed on its
own clock (as the lease does: no clocks compared between hosts); a key unchanged for a whole
`ttl` belongs to a dead daemon and is deleted. A daemon that stops cleanly deletes its own key,
so the others rebalance at their next look instead of after a `ttl`.
"""

from __future__ import annotations

import logging
import re

import anyio
import orjson

from busway._errors import RetryableError
from busway._nats.kv import Bucket

__all__ = ["Membership"]

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class Membership:
    """This daemon's heartbeat for one route, and its view of the others'."""

    def __init__(
        self, bucket: Bucket, route: str, holder: str, *, ttl: float, log: logging.Logger
    ) -> None:
        self._bucket = bucket
        self._prefix = f"=members.{route}."
        self.holder = holder
        self._key = self._prefix + _UNSAFE.sub("_", holder)
        self._ttl = ttl
        self._logger = log
        self._beats = 0
        self._seen: dict[str, tuple[bytes, float]] = {}
        """Member key → (value last seen, when it was first seen with that value)."""

    async def beat(self) -> None:
        """Write this daemon's heartbeat once (a failure is logged: the next one may pass)."""
        self._beats += 1
        value = orjson.dumps({"holder": self.holder, "beat": self._beats, "ttl": self._ttl})
        try:
            await self._bucket.put(self._key, value)
        except RetryableError as exc:
            self._logger.warning("partitions: heartbeat not written: %s", exc)

    async def run(self) -> None:
        """Beat every `ttl / 4` until cancelled; then delete the key (a clean leave)."""
        try:
            while True:
                await anyio.sleep(self._ttl / 4)
                await self.beat()
        finally:
            with anyio.move_on_after(min(2.0, self._ttl / 4), shield=True):
                try:
                    await self._bucket.delete(self._key)
                except RetryableError as exc:
                    self._logger.info("partitions: heartbeat key left behind: %s", exc)

    async def alive(self) -> list[str] | None:
        """The member keys of daemons alive now (this one always included), sorted; None if
        the bucket cannot be read (the caller keeps its previous view)."""
        try:
            entries = await self._bucket.entries(self._prefix + "*")
        except RetryableError as exc:
            self._logger.warning("partitions: cannot read the members: %s", exc)
            return None
        now = anyio.current_time()
        alive = {self._key}
        current: dict[str, tuple[bytes, float]] = {}
        for key, value in entries:
            seen = self._seen.get(key)
            if seen is None or seen[0] != value:
                seen = (value, now)
            current[key] = seen
            if key == self._key or now - seen[1] < self._ttl:
                alive.add(key)
            else:
                await self._bury(key)
        self._seen = current
        return sorted(alive)

    @property
    def key(self) -> str:
        """This daemon's member key."""
        return self._key

    async def _bury(self, key: str) -> None:
        self._logger.info("partitions: member %s stopped beating: it is gone", key)
        try:
            await self._bucket.delete(key)
        except RetryableError as exc:
            self._logger.info("partitions: cannot delete %s: %s", key, exc)
