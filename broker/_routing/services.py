"""The engine's side of `RouteServices`: requests for `enrich`, JetStream KV for `dedupe`.

The routers stay pure; what their async stages need from NATS comes through here.
"""

from __future__ import annotations

import hashlib
import re

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from busway._errors import RetryableError
from busway._routing.requests import Requester

__all__ = ["NatsRouteServices"]

_BUCKET_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class NatsRouteServices:
    """`RouteServices` for one route, on its connection."""

    def __init__(self, js: JetStreamContext, requester: Requester, *, replicas: int = 1) -> None:
        self._js = js
        self._requester = requester
        self._replicas = replicas
        self._buckets: dict[str, KeyValue] = {}

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
            await bucket.create(entry, owner.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            try:
                seen = await bucket.get(entry)
            except nats.js.errors.KeyNotFoundError:
                return await self.claim(scope, key, owner, window)  # expired meanwhile
            except nats.errors.Error as exc:
                raise RetryableError(f"dedupe: cannot read key state: {exc!r}") from exc
            return seen.value == owner.encode()
        except nats.errors.Error as exc:
            raise RetryableError(f"dedupe: cannot record the key: {exc!r}") from exc
        return True

    async def _bucket(self, scope: str, window: float) -> KeyValue:
        bucket = self._buckets.get(scope)
        if bucket is None:
            name = "busway_dedupe_" + _BUCKET_UNSAFE.sub("_", scope)
            try:
                bucket = await self._js.key_value(name)
            except nats.js.errors.BucketNotFoundError:
                bucket = await self._js.create_key_value(
                    KeyValueConfig(
                        bucket=name,
                        history=1,
                        ttl=window,
                        storage=StorageType.FILE,
                        replicas=self._replicas,
                    )
                )
            self._buckets[scope] = bucket
        return bucket
