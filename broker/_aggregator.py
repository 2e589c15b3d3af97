"""The `aggregate` stage's engine half: hold inputs by group, publish the group, then ack them.

Durability comes from JetStream twice over. The inputs of an incomplete group stay un-acked
(kept alive with `+WPI`), so a crash or restart simply redelivers them and the group forms
again; and the time each group started is kept in JetStream KV, so a restart does not restart
a group's `timeout` clock. The aggregate's `Nats-Msg-Id` derives from the group key and its
lowest input sequence, so a group published just before a crash, whose inputs come back, is
dropped by the stream as a duplicate rather than stored twice.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from busway._delivery import ACK, DRAIN_NAK
from busway._errors import RetryableError
from busway._jetstream import state_bucket
from busway.routers.context import MessageContext
from busway.routers.pipeline import RouteServices, RoutingError
from busway.routers.route import Route

if TYPE_CHECKING:
    from busway._route_worker import RouteWorker

__all__ = ["Aggregator"]


@dataclass(slots=True)
class _Group:
    started: float
    """Wall-clock time the group's first input arrived (kept in KV across restarts)."""
    members: dict[str, tuple[Msg, int]] = field(default_factory=dict)
    """Input sequence → (message, attempt): one entry per input, redeliveries replace it."""
    documents: dict[str, list[Any]] = field(default_factory=dict)
    """Input sequence → the bodies it added (a split input may add several)."""

    def bodies(self) -> list[Any]:
        return [body for bodies in self.documents.values() for body in bodies]


class Aggregator:
    """Groups of one route, keyed by the `by` expression."""

    def __init__(self, worker: RouteWorker, route: Route, services: RouteServices) -> None:
        assert route.aggregation is not None
        self.worker = worker
        self.route = route
        self.aggregation = route.aggregation
        self.services = services
        self.groups: dict[str, _Group] = {}
        self._refs: dict[str, int] = {}
        """Input sequence → how many open groups hold it: acked when the last one publishes."""
        self._bucket: KeyValue | None = None
        self._key_prefix = f"aggregate.{route.name}."
        self._lock = anyio.Lock()

    async def open(self) -> None:
        """Open the KV bucket the group clocks live in (the config's state bucket)."""
        self._bucket = await state_bucket(self.worker.js, self.worker.state_bucket_name)

    def _kv_key(self, key: str) -> str:
        return self._key_prefix + hashlib.blake2b(key.encode(), digest_size=16).hexdigest()

    async def add(
        self, message: Msg, sequence: str, attempt: int, context: MessageContext | None
    ) -> None:
        """Add an input to its group(s); publish every group it completes."""
        worker = self.worker
        try:
            pairs, side = await self.route.collect(message.data, context, self.services)
        except RoutingError as exc:
            await worker.reject(message, sequence, attempt, exc)
            return
        except RetryableError as exc:
            await worker.retry_later(message, sequence, attempt, str(exc), reason="route")
            return
        if side:
            await worker.publish_outputs(side, message, f"{worker.stream}:{sequence}")
        if not pairs:
            worker.stats.filtered += 1
            await worker.settle(message, ACK)
            return
        async with self._lock:
            complete = []
            for key, body in pairs:
                group = self.groups.get(key)
                if group is None:
                    group = self.groups[key] = _Group(started=await self._started(key))
                if sequence not in group.members:
                    self._refs[sequence] = self._refs.get(sequence, 0) + 1
                group.members[sequence] = (message, attempt)
                group.documents.setdefault(sequence, []).append(body)
                try:
                    done = self.aggregation.is_complete(self.aggregation.group(key, group.bodies()))
                except RoutingError as exc:
                    await self._fail(key, exc)
                    continue
                if done and key not in complete:
                    complete.append(key)
            for key in complete:
                await self._publish(key)

    async def _started(self, key: str) -> float:
        """When the group began: from KV if an earlier run started it, else now (recorded)."""
        assert self._bucket is not None
        kv_key = self._kv_key(key)
        try:
            entry = await self._bucket.get(kv_key)
            if entry.value:
                return float(entry.value)
        except nats.js.errors.KeyNotFoundError:
            pass
        except (nats.errors.Error, ValueError) as exc:
            self.worker.logger.warning("aggregate: cannot read the clock of a group: %s", exc)
        now = time.time()
        try:
            await self._bucket.put(kv_key, repr(now).encode())
        except nats.errors.Error as exc:
            self.worker.logger.warning("aggregate: cannot record the clock of a group: %s", exc)
        return now

    async def expire_groups(self) -> None:
        """Publish groups whose `timeout` has passed; checks a few times per timeout."""
        timeout = self.aggregation.timeout
        if timeout is None:
            return
        interval = min(1.0, max(0.05, timeout / 4))
        while True:
            await anyio.sleep(interval)
            cutoff = time.time() - timeout
            async with self._lock:
                for key in [k for k, group in self.groups.items() if group.started <= cutoff]:
                    await self._publish(key)

    async def _publish(self, key: str) -> None:
        group = self.groups.pop(key)
        worker = self.worker
        members = list(group.members.items())
        try:
            outputs = await self.route.finish(key, group.bodies(), self.services)
        except RoutingError as exc:
            await self._dead_letter(members, exc)
            self._forget_clock(key)
            return
        first = min(members, key=lambda member: int(member[0]))[0]
        id_base = f"{worker.stream}:{first}:agg"
        # The first input stands in for the group's headers (correlation ids and the like).
        futures = await worker.publish_outputs(outputs, members[0][1][0], id_base)
        error = (
            await worker.await_all(futures, outputs, time.monotonic() + worker.publish_timeout)
            if futures
            else None
        )
        for sequence, (message, attempt) in members:
            if error is None:
                if self._release(sequence, last_only=True):
                    await worker.settle(message, ACK)
            elif self._release(sequence, last_only=False):
                await worker.retry_later(message, sequence, attempt, str(error), reason="publish")
        if error is None:
            worker.stats.published += len(futures or ())
            self._forget_clock(key)

    async def _fail(self, key: str, error: RoutingError) -> None:
        group = self.groups.pop(key)
        await self._dead_letter(list(group.members.items()), error)
        self._forget_clock(key)

    async def _dead_letter(
        self, members: list[tuple[str, tuple[Msg, int]]], error: RoutingError
    ) -> None:
        for sequence, (message, attempt) in members:
            if self._release(sequence, last_only=False):
                await self.worker.reject(message, sequence, attempt, error)

    def _release(self, sequence: str, *, last_only: bool) -> bool:
        """Drop a group's hold on an input; True if the caller should settle it now.

        Success settles (acks) only when the last group holding the input is published; a
        failure settles (naks or dead-letters) at once, and later groups then skip it.
        """
        refs = self._refs.get(sequence)
        if refs is None:
            return False
        if last_only and refs > 1:
            self._refs[sequence] = refs - 1
            return False
        del self._refs[sequence]
        return True

    def _forget_clock(self, key: str) -> None:
        bucket = self._bucket
        if bucket is None:
            return

        async def forget() -> None:
            try:
                await bucket.delete(self._kv_key(key))
            except nats.errors.Error as exc:
                self.worker.logger.warning("aggregate: cannot clear a group clock: %s", exc)

        self.worker.spawn(forget())

    async def release_all(self) -> None:
        """At shutdown: nak every held input at once, so the next run regroups them."""
        async with self._lock:
            groups, self.groups = self.groups, {}
            for group in groups.values():
                for sequence, (message, _) in group.members.items():
                    if self._release(sequence, last_only=False):
                        await self.worker.settle(message, DRAIN_NAK)
