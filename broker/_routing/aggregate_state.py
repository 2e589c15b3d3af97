"""What an aggregating route keeps in JetStream KV so that a crash never splits or repeats a group.

Two kinds of records, in the config's state bucket, under `aggregate.<route>.`:

* `<hash of the group key>`: the wall-clock time the group began, so a restart does not
  restart its `timeout`. Read only for groups re-formed from inputs held before the restart.
* `done.<hash of the group key>.<lowest input sequence>`: `{"key": ..., "members": [...]}`,
  written once a group's aggregate is stored and before its inputs are acked. If the process
  dies while those acks are on their way, the inputs that come back are acked on arrival rather
  than grouped again (a second aggregate with some of the same inputs). It is deleted once the
  acks are known to have reached the server (a flush), or, after a crash, once the consumer's
  ack floor has passed every member.

Also: the consumer's state when the route starts (`Snapshot`), which tells inputs held by the
previous process (sequence at most `delivered`) from new ones.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import orjson

from busway._errors import RetryableError
from busway._nats.jetstream import consumer_state, open_state
from busway._nats.kv import Bucket

if TYPE_CHECKING:
    from busway._nats.types import JetStream

__all__ = ["AggregateState", "DoneRecord", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The route's consumer as this process found it, before pulling anything."""

    delivered: int
    """Highest stream sequence delivered to the previous process: inputs up to it are old."""
    pending: int
    """Inputs delivered but not acked: they come back (after `ack_wait`) to this process."""
    ack_floor: int
    """Every input up to this stream sequence is acked."""


@dataclass(slots=True)
class DoneRecord:
    """A published group whose inputs' acks are not known to have reached the server."""

    kv_key: str
    key: str
    members: list[str]
    """Stream sequences of its inputs."""


class AggregateState:
    """The KV records of one aggregating route; see the module docstring."""

    def __init__(self, js: JetStream, bucket_name: str, route: str) -> None:
        self.js = js
        self.bucket_name = bucket_name
        self.prefix = f"aggregate.{route}."
        self.logger = logging.getLogger(f"busway.route.{route}")
        self._bucket: Bucket | None = None
        self._done: dict[str, set[str]] = {}
        """Input sequence → keys of published groups that held it (records still kept)."""
        self._records: dict[str, DoneRecord] = {}
        self._await_floor: set[str] = set()
        """Records to delete once the ack floor passes them (left by a crash, or unflushed)."""

    async def open(self, stream: str, durable: str) -> Snapshot | None:
        """Open the bucket, read the consumer's state and the records a crash left behind.

        None if the consumer's state cannot be read: then every input is treated as new.
        """
        self._bucket = await open_state(self.js, self.bucket_name)
        try:
            state = await consumer_state(self.js, stream, durable)
        except RetryableError as exc:
            self.logger.warning("aggregate: cannot read the consumer's state (%s)", exc)
            return None
        snapshot = Snapshot(
            delivered=state.delivered, pending=state.ack_pending, ack_floor=state.ack_floor
        )
        await self._load_records()
        await self.clear_acked(snapshot.ack_floor)
        return snapshot

    async def _load_records(self) -> None:
        assert self._bucket is not None
        try:
            entries = await self._bucket.entries(f"{self.prefix}done.>")
        except RetryableError as exc:
            self.logger.warning("aggregate: cannot read the published-group records (%s)", exc)
            return
        for kv_key, value in entries:
            record = _parse(kv_key, value)
            if record is None:
                self.logger.warning("aggregate: ignoring a damaged record %s", kv_key)
                continue
            self._keep(record)
            self._await_floor.add(record.kv_key)

    # -- group clocks ----------------------------------------------------------------------

    def _clock_key(self, key: str) -> str:
        return self.prefix + _digest(key)

    async def started(self, key: str, *, restored: bool) -> float:
        """When the group began: from KV if it is re-formed after a restart, else now."""
        assert self._bucket is not None
        kv_key = self._clock_key(key)
        if restored:
            try:
                value = await self._bucket.get(kv_key)
                if value:
                    return float(value)
            except (RetryableError, ValueError) as exc:
                self.logger.warning("aggregate: cannot read the clock of a group: %s", exc)
        now = time.time()
        try:
            await self._bucket.put(kv_key, repr(now).encode())
        except RetryableError as exc:
            self.logger.warning("aggregate: cannot record the clock of a group: %s", exc)
        return now

    async def forget_clock(self, key: str) -> None:
        """Delete a published group's clock."""
        assert self._bucket is not None
        try:
            await self._bucket.delete(self._clock_key(key))
        except RetryableError as exc:
            self.logger.warning("aggregate: cannot clear a group clock: %s", exc)

    # -- published groups ------------------------------------------------------------------

    def published_keys(self, sequence: str) -> set[str] | None:
        """Keys of published groups that held input `sequence` (its ack may have been lost)."""
        return self._done.get(sequence)

    async def record_done(self, key: str, members: list[str]) -> DoneRecord | None:
        """Record that the group `key` of `members` is stored, before its inputs are acked.

        None if the record cannot be written (logged): the acks go ahead, as they did before
        such records existed; only a crash in the next instant could then repeat the group.
        """
        assert self._bucket is not None
        first = min(members, key=int)
        kv_key = f"{self.prefix}done.{_digest(key)}.{first}"
        value = orjson.dumps({"key": key, "members": [int(sequence) for sequence in members]})
        try:
            await self._bucket.put(kv_key, value)
        except RetryableError as exc:
            self.logger.warning("aggregate: cannot record a published group: %s", exc)
            return None
        record = DoneRecord(kv_key=kv_key, key=key, members=list(members))
        self._keep(record)
        return record

    async def acks_confirmed(self, record: DoneRecord) -> None:
        """The server has the acks of `record`'s inputs (a flush returned): delete it."""
        await self._forget(record)

    def acks_unconfirmed(self, record: DoneRecord) -> None:
        """The acks of `record` may be lost: keep it until the ack floor passes it."""
        self._await_floor.add(record.kv_key)

    @property
    def awaiting_floor(self) -> bool:
        """True while some records wait for the consumer's ack floor."""
        return bool(self._await_floor)

    async def clear_acked(self, ack_floor: int) -> None:
        """Delete the records every member of which is at or below `ack_floor` (all acked)."""
        for kv_key in list(self._await_floor):
            record = self._records.get(kv_key)
            if record is None:
                self._await_floor.discard(kv_key)
            elif max(int(sequence) for sequence in record.members) <= ack_floor:
                await self._forget(record)

    async def ack_floor(self, stream: str, durable: str) -> int | None:
        """The consumer's ack floor now, or None if it cannot be read."""
        try:
            return (await consumer_state(self.js, stream, durable)).ack_floor
        except RetryableError:
            return None

    def _keep(self, record: DoneRecord) -> None:
        self._records[record.kv_key] = record
        for sequence in record.members:
            self._done.setdefault(sequence, set()).add(record.key)

    async def _forget(self, record: DoneRecord) -> None:
        assert self._bucket is not None
        try:
            await self._bucket.delete(record.kv_key)
        except RetryableError as exc:
            self.logger.warning("aggregate: cannot clear a published-group record: %s", exc)
            self._await_floor.add(record.kv_key)
            return
        self._records.pop(record.kv_key, None)
        self._await_floor.discard(record.kv_key)
        for sequence in record.members:
            keys = self._done.get(sequence)
            if keys is not None:
                keys.discard(record.key)
                if not keys:
                    del self._done[sequence]


def _digest(key: str) -> str:
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _parse(kv_key: str, value: bytes | None) -> DoneRecord | None:
    try:
        document = orjson.loads(value or b"")
        return DoneRecord(
            kv_key=kv_key,
            key=str(document["key"]),
            members=[str(int(sequence)) for sequence in document["members"]],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None
