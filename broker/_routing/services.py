"""The engine's side of `RouteServices`: requests for `enrich`, JetStream KV for `dedupe`.

The routers stay pure; what their async stages need from NATS comes through here.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING

from busway._errors import RetryableError
from busway._nats.kv import Bucket, open_bucket
from busway._nats.requests import Requester

if TYPE_CHECKING:
    from busway._nats.types import JetStream

__all__ = ["NatsRouteServices"]

_BUCKET_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class NatsRouteServices:
    """`RouteServices` for one route, on its connection."""

    def __init__(self, js: JetStream, requester: Requester, *, replicas: int = 1) -> None:
        self._js = js
        self._requester = requester
        self._replicas = replicas
        self._buckets: dict[str, Bucket] = {}

    async def request(
        self, subject: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> bytes:
        """Ask `subject`; the answer's body. TimeoutError if nobody answers in time."""
        answer = await self._requester.request(subject, body, headers, timeout)
        return answer.data

    async def claim(self, scope: str, key: str, owner: str, window: float) -> bool:
        """Record `key` for `owner` in the dedupe bucket of `scope` (entries live `window`).

        The key is hashed: any JSON value can be a dedupe key, KV keys allow few characters.
        """
        bucket = await self._bucket(scope, window)
        entry = hashlib.blake2b(key.encode(), digest_size=16).hexdigest()
        try:
            if await bucket.create(entry, owner.encode()):
                return True
            seen = await bucket.get(entry)
        except RetryableError as exc:
            raise RetryableError(f"dedupe: {exc}") from exc
        if seen is None:
            return await self.claim(scope, key, owner, window)  # expired meanwhile
        return seen == owner.encode()

    async def _bucket(self, scope: str, window: float) -> Bucket:
        bucket = self._buckets.get(scope)
        if bucket is None:
            name = "busway_dedupe_" + _BUCKET_UNSAFE.sub("_", scope)
            bucket = self._buckets[scope] = await open_bucket(
                self._js, name, ttl=window, replicas=self._replicas
            )
        return bucket
