"""The `aggregate` stage's engine half: hold inputs by group, publish the group, then ack them.

Durability comes from JetStream. The inputs of an incomplete group stay un-acked (kept alive
with `+WPI`), so a crash or restart redelivers them and the group forms again. Three rules make
it form *the same* group, published once (see `_aggregate_state` for the KV records):

* After a restart, inputs held by the previous process come back only after `ack_wait`, while
  new inputs arrive at once. Grouping waits until every input the consumer reported un-acked
  at start-up is back (at most `2 * ack_wait + 2s` after start-up or after the last one that
  came back), then takes the backlog in stream order:
  old inputs rejoin the groups they were in, new ones follow, as if nothing had happened.
* A group's start time is kept in KV, so a restart does not restart its `timeout`; an input
  arriving after a group's deadline starts the next group rather than joining a late one.
* Before a group's inputs are acked, a record names them: if the process dies while the acks
  are on their way, the inputs that come back are acked, not grouped a second time. The
  aggregate's `Nats-Msg-Id` derives from its lowest input sequence, so a group re-formed
  after a crash between its PubAck and that record is dropped by the stream as a duplicate
  (within the stream's `duplicate_window`).
"""

from __future__ import annotations

import heapq
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio

from busway._delivery.contract import ACK, DRAIN_NAK
from busway._delivery.delivery import Delivery
from busway._errors import BusUnavailable, RetryableError
from busway._observe.metrics import ComponentStats
from busway._routing.aggregate_state import AggregateState, DoneRecord, Snapshot
from busway.routers.context import MessageContext
from busway.routers.pipeline import Output, RouteServices, RoutingError
from busway.routers.route import Route

__all__ = ["Aggregator", "AggregatorHost"]

_Input = tuple[Delivery, str, int, MessageContext | None]


class AggregatorHost(Protocol):
    """What an `Aggregator` needs from the route it runs in (a `RouteWorker`), and no more.

    The aggregator holds deliveries; the host publishes what they produce, settles them
    (ack, retry with back-off, dead-letter by the route's rules), confirms that acks reached
    the server, and runs background work in its task group.
    """

    stream: str
    durable: str
    ack_wait: float
    logger: logging.Logger
    stats: ComponentStats

    async def publish_side(self, outputs: list[Output], message: Delivery, id_base: str) -> None:
        """Publish outputs that are not part of a group (wiretaps, replies), not waited for."""

    async def publish_group(
        self, outputs: list[Output], headers_from: Delivery, id_base: str
    ) -> tuple[int, Exception | None]:
        """Publish a group's outputs (ids `<id_base>:<route>:<n>`, headers of `headers_from`)
        and wait for their PubAcks: (outputs stored, the first failure or None)."""

    async def confirm_acks(self) -> None:
        """Return once the server has every ack sent so far; BusUnavailable if not."""

    async def settle(self, message: Delivery, payload: bytes) -> None:
        """Send `payload` (ack, nak) for `message`, once."""

    async def retry_later(
        self, message: Delivery, sequence: str, attempt: int, error: str, *, reason: str
    ) -> None:
        """Nak `message` with back-off (dead-letter it after `max_attempts`)."""

    async def reject(
        self, message: Delivery, sequence: str, attempt: int, error: RoutingError
    ) -> None:
        """Retry or dead-letter `message` for a routing error, by the route's rules."""

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` in the host's task group; its errors are logged."""


@dataclass(slots=True)
class _Group:
    started: float
    """Wall-clock time the group's first input arrived (kept in KV across restarts)."""
    members: dict[str, tuple[Delivery, int]] = field(default_factory=dict)
    """Input sequence → (message, attempt): one entry per input, redeliveries replace it."""
    documents: dict[str, list[Any]] = field(default_factory=dict)
    """Input sequence → the bodies it added (a split input may add several)."""

    def bodies(self) -> list[Any]:
        return [body for bodies in self.documents.values() for body in bodies]


@dataclass(slots=True)
class _Restart:
    """Inputs received since start-up, held back until the previous process's ones are back."""

    snapshot: Snapshot
    deadline: float
    """Monotonic time after which grouping resumes without the inputs still missing."""
    grace: float
    """How long to wait for the next missing input (from start-up, then from each return)."""
    backlog: list[tuple[int, int, _Input]] = field(default_factory=list)
    """A heap of (stream sequence, arrival number, input)."""
    old: set[str] = field(default_factory=set)
    """Sequences of inputs back from the previous process."""
    clocked: set[str] = field(default_factory=set)
    """Group keys formed since start-up: their clock in KV is this process's own."""
    draining: bool = False
    arrivals: int = 0


class Aggregator:
    """Groups of one route, keyed by the `by` expression."""

    def __init__(
        self,
        worker: AggregatorHost,
        route: Route,
        services: RouteServices,
        state: AggregateState,
    ) -> None:
        assert route.aggregation is not None
        self.worker = worker
        self.route = route
        self.aggregation = route.aggregation
        self.services = services
        self.groups: dict[str, _Group] = {}
        self._refs: dict[str, int] = {}
        """Input sequence → how many open groups hold it: acked when the last one publishes."""
        self.state = state
        self._restart: _Restart | None = None
        self._old_up_to = 0
        """Inputs up to this stream sequence were delivered to an earlier process."""
        self._lock = anyio.Lock()

    async def open(self) -> None:
        """Open the KV records; after an unclean stop, hold grouping until old inputs are back."""
        worker = self.worker
        snapshot = await self.state.open(worker.stream, worker.durable)
        if snapshot is None:
            return
        self._old_up_to = snapshot.delivered
        if snapshot.pending:
            grace = 2 * worker.ack_wait + 2.0
            self._restart = _Restart(
                snapshot=snapshot, deadline=time.monotonic() + grace, grace=grace
            )
            worker.logger.info(
                "aggregate: %d input(s) held by the previous run come back within ack_wait; "
                "grouping waits for them (at most %.0fs) to re-form the same groups",
                snapshot.pending,
                grace,
            )

    # -- receiving ---------------------------------------------------------------------------

    async def add(
        self, message: Delivery, sequence: str, attempt: int, context: MessageContext | None
    ) -> None:
        """Add an input to its group(s); publish every group it completes."""
        restart = self._restart
        if restart is None:
            await self._add(message, sequence, attempt, context)
            return
        restart.arrivals += 1
        held = (message, sequence, attempt, context)
        heapq.heappush(restart.backlog, (int(sequence), restart.arrivals, held))
        if int(sequence) <= restart.snapshot.delivered:
            restart.old.add(sequence)
            # Held inputs are still coming back (suspects pass the isolation gate one at a
            # time, which can take longer than the grace on a loaded machine): keep waiting
            # while they do; the bound counts from the last one.
            restart.deadline = max(restart.deadline, time.monotonic() + restart.grace)
        if len(restart.old) >= restart.snapshot.pending:
            await self._resume()

    async def _resume(self) -> None:
        """Group the backlog in stream order (and what arrives meanwhile), then go live."""
        restart = self._restart
        if restart is None or restart.draining:
            return
        restart.draining = True
        while restart.backlog:
            _, _, (message, sequence, attempt, context) = heapq.heappop(restart.backlog)
            await self._add(message, sequence, attempt, context)
        self._restart = None

    async def _add(
        self, message: Delivery, sequence: str, attempt: int, context: MessageContext | None
    ) -> None:
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
            await worker.publish_side(side, message, f"{worker.stream}:{sequence}")
        if not pairs:
            worker.stats.filtered += 1
            await worker.settle(message, ACK)
            return
        async with self._lock:
            published = self.state.published_keys(sequence)
            by_key: dict[str, list[Any]] = {}
            for key, body in pairs:
                if published is None or key not in published:
                    by_key.setdefault(key, []).append(body)
            if not by_key:
                # Every group it belongs to is published: its ack was lost in a crash.
                worker.stats.count("aggregate_inputs_acked_again")
                await worker.settle(message, ACK)
                return
            complete = []
            for key, bodies in by_key.items():
                group = await self._group_for(key, sequence)
                if sequence not in group.members:
                    self._refs[sequence] = self._refs.get(sequence, 0) + 1
                group.members[sequence] = (message, attempt)
                group.documents[sequence] = bodies  # a redelivery replaces, never doubles
                try:
                    done = self.aggregation.is_complete(self.aggregation.group(key, group.bodies()))
                except RoutingError as exc:
                    await self._fail(key, exc)
                    continue
                if done and key not in complete:
                    complete.append(key)
            for key in complete:
                await self._publish(key)

    async def _group_for(self, key: str, sequence: str) -> _Group:
        """The open group of `key`, or a new one (an expired group is published first)."""
        group = self.groups.get(key)
        timeout = self.aggregation.timeout
        if group is not None and timeout is not None and group.started + timeout <= time.time():
            await self._publish(key)  # its time is up: this input starts the next group
            group = None
        if group is None:
            restart = self._restart
            # Only a group re-formed from an earlier process's inputs has a clock in KV.
            restored = int(sequence) <= self._old_up_to and (
                restart is None or key not in restart.clocked
            )
            if restart is not None:
                restart.clocked.add(key)
            started = await self.state.started(key, restored=restored)
            group = self.groups[key] = _Group(started=started)
        return group

    # -- housekeeping -------------------------------------------------------------------------

    async def expire_groups(self) -> None:
        """Publish groups whose `timeout` has passed; end a restart's wait; clear old records.

        Checks a few times per timeout (every second without one).
        """
        timeout = self.aggregation.timeout
        interval = min(1.0, max(0.05, timeout / 4)) if timeout is not None else 1.0
        next_floor_check = 0.0
        while True:
            await anyio.sleep(interval)
            restart = self._restart
            if restart is not None and time.monotonic() >= restart.deadline:
                self.worker.logger.warning(
                    "aggregate: %d of %d input(s) held by the previous run did not come back "
                    "in time; grouping resumes without them",
                    restart.snapshot.pending - len(restart.old),
                    restart.snapshot.pending,
                )
                await self._resume()
            if timeout is not None:
                cutoff = time.time() - timeout
                async with self._lock:
                    for key in [k for k, group in self.groups.items() if group.started <= cutoff]:
                        await self._publish(key)
            if self.state.awaiting_floor and time.monotonic() >= next_floor_check:
                next_floor_check = time.monotonic() + max(1.0, self.worker.ack_wait)
                floor = await self.state.ack_floor(self.worker.stream, self.worker.durable)
                if floor is not None:
                    await self.state.clear_acked(floor)

    # -- publishing ---------------------------------------------------------------------------

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
        stored, error = await worker.publish_group(outputs, members[0][1][0], id_base)
        record = None
        if error is None:
            record = await self.state.record_done(key, [sequence for sequence, _ in members])
        for sequence, (message, attempt) in members:
            if error is None:
                if self._release(sequence, last_only=True):
                    await worker.settle(message, ACK)
            elif self._release(sequence, last_only=False):
                await worker.retry_later(message, sequence, attempt, str(error), reason="publish")
        if error is None:
            worker.stats.published += stored
            self._forget_clock(key)
            if record is not None:
                worker.spawn(self._confirm_acks(record))

    async def _confirm_acks(self, record: DoneRecord) -> None:
        """Once the server has the acks (a flush), the group's record is no longer needed."""
        try:
            await self.worker.confirm_acks()
        except BusUnavailable:
            self.state.acks_unconfirmed(record)
            return
        await self.state.acks_confirmed(record)

    async def _fail(self, key: str, error: RoutingError) -> None:
        group = self.groups.pop(key)
        await self._dead_letter(list(group.members.items()), error)
        self._forget_clock(key)

    async def _dead_letter(
        self, members: list[tuple[str, tuple[Delivery, int]]], error: RoutingError
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
        self.worker.spawn(self.state.forget_clock(key))

    async def release_all(self) -> None:
        """At shutdown: nak every held input at once, so the next run regroups them."""
        async with self._lock:
            groups, self.groups = self.groups, {}
            for group in groups.values():
                for sequence, (message, _) in group.members.items():
                    if self._release(sequence, last_only=False):
                        await self.worker.settle(message, DRAIN_NAK)
            restart, self._restart = self._restart, None
            for _, _, (message, _, _, _) in restart.backlog if restart is not None else ():
                await self.worker.settle(message, DRAIN_NAK)
