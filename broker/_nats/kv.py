"""JetStream key-value buckets with busway's errors: what the engine keeps in KV goes through here.

`Bucket` has the operations the engine uses (get, put, create-if-absent, delete, read a key
range once) and raises `BusUnavailable` / `JetStreamError` (both `RetryableError`), each naming
the bucket, the operation and the key; an absent key is `None` or `False`, never an error.
`KeyValueState` (a source's `StateStore`) and `KeyValueDedupStore` (a source's `DedupStore`)
are built on it; the route services' dedupe, the aggregate records and the isolation ledger use
it directly, so none of them imports nats-py.
"""

from __future__ import annotations

import asyncio

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from busway._components import StateEntry
from busway._errors import BusUnavailable, RetryableError
from busway._nats.errors import TRANSPORT_ERRORS, map_exceptions, translate

__all__ = [
    "Bucket",
    "KeyValueDedupStore",
    "KeyValueState",
    "open_bucket",
]


class Bucket:
    """One JetStream key-value bucket; every failure is a busway error naming the key."""

    __slots__ = ("_kv", "name")

    def __init__(self, kv: KeyValue, name: str = "") -> None:
        self._kv = kv
        self.name = name
        """The bucket's name, for messages ("" if the opener did not say)."""

    @property
    def kv(self) -> KeyValue:
        """nats-py's handle, for the other `_nats` modules that need revision-level operations
        (the lease); nothing outside `_nats` uses it."""
        return self._kv

    def _what(self, operation: str, key: str) -> str:
        return (
            f"{operation} {key!r} in bucket {self.name!r}" if self.name else f"{operation} {key!r}"
        )

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if absent, deleted or expired."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, self._what("cannot read", key)) from exc
        return entry.value

    async def entry(self, key: str) -> tuple[bytes, int] | None:
        """The value under `key` and its revision, or None if absent, deleted or expired."""
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, self._what("cannot read", key)) from exc
        return entry.value or b"", entry.revision or 0

    async def compare_and_set(self, key: str, value: bytes, *, revision: int) -> bool:
        """Store `value` if `key` is still at `revision` (0: absent or deleted); else False."""
        try:
            if revision:
                await self._kv.update(key, value, last=revision)
            else:
                await self._kv.create(key, value)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            return False
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, self._what("cannot store", key)) from exc
        return True

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`, confirmed by JetStream."""
        with map_exceptions(self._what("cannot store", key)):
            await self._kv.put(key, value)

    async def create(self, key: str, value: bytes) -> bool:
        """Store `value` only if `key` is absent: True if stored, False if it was present (it
        may have expired since: read it to know)."""
        try:
            await self._kv.create(key, value)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
            # nats-py reads the key back after a conflict; it may expire in between.
            return False
        except TRANSPORT_ERRORS as exc:
            raise translate(exc, self._what("cannot record", key)) from exc
        return True

    async def delete(self, key: str) -> None:
        """Forget `key` (a delete marker; absent keys are fine)."""
        with map_exceptions(self._what("cannot delete", key)):
            await self._kv.delete(key)

    async def entries(self, pattern: str) -> list[tuple[str, bytes]]:
        """Every live key matching `pattern` (`prefix.>`) with its value, read once."""
        found: list[tuple[str, bytes]] = []
        with map_exceptions(self._what("cannot list", pattern)):
            watcher = await self._kv.watch(pattern, ignore_deletes=True)
            try:
                async for entry in watcher:
                    if entry is None:  # the initial values are all delivered
                        break
                    found.append((entry.key, entry.value or b""))
            finally:
                await watcher.stop()  # type: ignore[no-untyped-call]  # nats-py leaves it untyped
        return found


async def open_bucket(js: JetStreamContext, name: str, *, ttl: float, replicas: int = 1) -> Bucket:
    """The bucket `name`, created (entries live `ttl` seconds, on `replicas` servers) if missing."""
    with map_exceptions(f"cannot open bucket {name!r}"):
        try:
            kv = await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(
                KeyValueConfig(
                    bucket=name, history=1, ttl=ttl, storage=StorageType.FILE, replicas=replicas
                )
            )
    return Bucket(kv, name)


class KeyValueState:
    """A `StateStore` on a JetStream key-value bucket, with keys prefixed per component."""

    def __init__(self, bucket: KeyValue | Bucket, prefix: str) -> None:
        self._bucket = bucket if isinstance(bucket, Bucket) else Bucket(bucket)
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if absent or deleted."""
        return await self._bucket.get(self._prefix + key)

    async def entry(self, key: str) -> StateEntry | None:
        """The value under `key` and its revision, or None if absent or deleted."""
        found = await self._bucket.entry(self._prefix + key)
        return None if found is None else StateEntry(value=found[0], revision=found[1])

    async def compare_and_set(self, key: str, value: bytes, *, revision: int) -> bool:
        """Store `value` if `key` is still at `revision` (0: absent or deleted); else False."""
        return await self._bucket.compare_and_set(self._prefix + key, value, revision=revision)

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; RetryableError if JetStream did not confirm."""
        await self._bucket.put(self._prefix + key, value)

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        await self._bucket.delete(self._prefix + key)


class KeyValueDedupStore:
    """A `DedupStore`: a key-value bucket whose TTL is a stream's duplicate window.

    Each operation is bounded by `timeout` (the publish timeout), like a publish: a request
    waits no longer on its record than on its message.
    """

    def __init__(self, bucket: KeyValue | Bucket, ttl: float, *, timeout: float) -> None:
        self._bucket = bucket if isinstance(bucket, Bucket) else Bucket(bucket)
        self.ttl = ttl
        self._timeout = timeout

    async def create(self, key: str, value: bytes) -> bytes | None:
        """Store `value` unless `key` is present: None if stored, else the present value."""
        for _ in range(3):  # present, then expired before we could read it: try again
            try:
                async with asyncio.timeout(self._timeout):
                    stored = await self._bucket.create(key, value)
            except TimeoutError:
                raise self._late("record", key) from None
            if stored:
                return None
            present = await self.get(key)
            if present is not None:
                return present
        raise RetryableError(f"cannot record {key!r}: it keeps changing")

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if absent, deleted or expired."""
        try:
            async with asyncio.timeout(self._timeout):
                return await self._bucket.get(key)
        except TimeoutError:
            raise self._late("read", key) from None

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; RetryableError if JetStream did not confirm."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._bucket.put(key, value)
        except TimeoutError:
            raise self._late("store", key) from None

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._bucket.delete(key)
        except TimeoutError:
            raise self._late("delete", key) from None

    def _late(self, operation: str, key: str) -> BusUnavailable:
        return BusUnavailable(f"cannot {operation} {key!r}: no answer within {self._timeout:g}s")
