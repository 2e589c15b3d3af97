"""Runs one route: pull → the route's stages → publish every output → ack after all PubAcks.

The hot path is two tasks. The pull callback runs the route and hands each output to
`publish_async` without waiting (the publish window bounds how many are unconfirmed); the
settler walks inputs in arrival order, waits for each one's PubAcks and acks it. JetStream
answers PubAcks in order, so waiting in order costs nothing and keeps the code simple.

Routes with stages that wait (enrich, dedupe, throttle, Python) run each message in its own
task of the component's task group, up to `max_in_flight` at once; the settler still acks in
arrival order. Routes with an `aggregate` stage hand their inputs to an `Aggregator`, which
holds them until their group is published.

Every path settles its message: a `RoutingError` is retried or dead-lettered by its kind, and
anything else that escapes the route (a bug, a foreign error) goes to `fail_unexpected`.

Every output carries `Nats-Msg-Id = <stream>:<sequence>:<route>:<index>`: a redelivered input
republishes the same ids, and the output stream drops the copies (within its duplicate window).
Wiretap copies get ids too, but their PubAcks never hold the input back; replies go to the
requester's inbox on core NATS.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import anyio

from busway._delivery.consumer import ConsumerComponent
from busway._delivery.contract import ACK, REPLAY_ORIGIN_HEADER, passthrough_headers
from busway._delivery.delivery import Delivery
from busway._errors import BusUnavailable, RetryableError
from busway._nats.internals import publish_output
from busway._nats.jetstream import await_pub_ack, flush, publish_core
from busway._routing.aggregate_state import AggregateState
from busway._routing.aggregator import Aggregator
from busway._routing.hops import HopCounter
from busway.routers.context import MessageContext
from busway.routers.pipeline import OUT, REPLY, Output, RouteServices, RoutingError
from busway.routers.route import Route

if TYPE_CHECKING:
    from busway._nats.types import PubAck

__all__ = ["RouteWorker"]

_Futures = list["asyncio.Future[PubAck]"]

# What an input waits for: the PubAck futures of its OUT outputs, the outputs (OUT ones
# first, so `outputs[i]` names the subject of `futures[i]`), and when they were published.
_Published = tuple[_Futures, list[Output], float]

# An input waiting for its outputs' PubAcks: (message, published, sequence, attempt, received).
# `published` is a future for routes that process messages concurrently: the message's task
# resolves it with the futures, or None when it settled the message itself (filtered, retried,
# dead-lettered). A plain tuple: one is built per message, and a tuple is the cheapest record.
_Pending = tuple[Delivery, "_Published | asyncio.Future[_Published | None]", str, int, float]


class RouteWorker(ConsumerComponent):
    """One route's consumer, publisher and settler."""

    def __init__(
        self,
        *,
        route: Route,
        services: RouteServices,
        state_bucket: str,
        hop_limit: int | None = None,
        state_scope: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.state_scope = state_scope or route.name
        """Names the route's aggregate records: one scope per consumer (a partition has its
        own, since its consumer's ack floor only speaks for its own inputs)."""
        self.hops = HopCounter(hop_limit) if hop_limit is not None else None
        """Set on routes a cycle may pass through: they count hops and enforce the limit."""
        self.route = route
        self.services = services
        self.state_bucket_name = state_bucket
        self._id_prefix = f"{self.stream}:"
        self._id_suffix = f":{route.name}:"
        self._indexes = [str(index) for index in range(64)]
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wake = asyncio.Event()
        self.aggregator: Aggregator | None = None

    async def start_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the in-order settler (and the aggregator, if any)."""
        tg.start_soon(self._settle_in_order)
        if self.route.aggregation is not None:
            state = AggregateState(self.js, self.state_bucket_name, self.state_scope)
            self.aggregator = Aggregator(self, self.route, self.services, state)
            await self.aggregator.open()
            tg.start_soon(self.aggregator.expire_groups)

    async def drain(self, timeout: float) -> bool:
        """Stop pulling; hand back the inputs of incomplete groups; wait for the rest."""
        self.stopping = True
        if self.aggregator is not None:
            await self.aggregator.release_all()
        return await super().drain(timeout)

    def context_of(self, message: Delivery, sequence: str, attempt: int) -> MessageContext | None:
        """The message's context if the route's expressions read it, else None."""
        if not self.route.needs_context:
            return None
        return MessageContext(message.subject, message.headers, self.stream, int(sequence), attempt)

    async def handle(self, message: Delivery) -> None:
        """Run the route and publish its outputs; the settler acks once they are stored."""
        received = time.monotonic()
        sequence, attempt = message.sequence, message.attempt
        route = self.route
        if self.hops is not None and (looping := self.hops.refusal(message.headers)):
            await self.reject(message, sequence, attempt, looping)
            return
        # [isolation] While suspects wait, this route's messages go through the guarded path.
        if route.is_async or route.aggregation is not None or self.suspects:
            self._spawn(message, sequence, attempt, received)
            return
        if not self.gate.open:  # [isolation] a suspect is processed alone: wait for it
            await self.gate.wait_open()
        try:
            outputs = route.process(message.data, self.context_of(message, sequence, attempt))
            futures = await self.publish_outputs(outputs, message, self._id_base(message, sequence))
        except RoutingError as exc:
            await self.reject(message, sequence, attempt, exc)
            return
        except Exception as exc:
            await self.fail_unexpected(message, exc)
            return
        if futures is None:
            await self._settle_without_outputs(message, outputs)
            return
        # Published microseconds after `received`: one clock read serves as both.
        self._pending.append((message, (futures, outputs, received), sequence, attempt, received))
        self._wake.set()

    def spawn(self, work: Awaitable[Any]) -> None:
        """Run `work` (not tied to one message) in the component's task group; an error it
        raises is logged, never allowed to end the component."""

        async def guarded() -> None:
            try:
                await work
            except Exception as exc:
                self.logger.error("background task failed: %s: %s", type(exc).__name__, exc)

        self.task_group.start_soon(guarded)

    def _spawn(self, message: Delivery, sequence: str, attempt: int, received: float) -> None:
        context = self.context_of(message, sequence, attempt)
        if self.aggregator is not None:
            self.task_group.start_soon(self._aggregate, message, sequence, attempt, context)
            return
        published: asyncio.Future[_Published | None] = asyncio.get_running_loop().create_future()
        self._pending.append((message, published, sequence, attempt, received))
        self._wake.set()
        self.task_group.start_soon(
            self._process_async, message, sequence, attempt, context, published
        )

    async def _aggregate(
        self, message: Delivery, sequence: str, attempt: int, context: MessageContext | None
    ) -> None:
        assert self.aggregator is not None
        try:  # [isolation] guarded: alone if a suspect
            await self.isolation.guard(
                message.reply, self.aggregator.add, message, sequence, attempt, context
            )
        except Exception as exc:
            await self.fail_unexpected(message, exc)

    async def _process_async(
        self,
        message: Delivery,
        sequence: str,
        attempt: int,
        context: MessageContext | None,
        published: asyncio.Future[_Published | None],
    ) -> None:
        result: _Published | None = None
        try:
            result = await self._run_async(message, sequence, attempt, context)
        except Exception as exc:
            await self.fail_unexpected(message, exc)
        finally:
            # Whatever happened, the settler must not wait for this message forever.
            if not published.done():
                published.set_result(result)

    async def _run_async(
        self, message: Delivery, sequence: str, attempt: int, context: MessageContext | None
    ) -> _Published | None:
        try:  # [isolation] guarded: alone if a suspect
            outputs = await self.isolation.guard(message.reply, self._outputs_of, message, context)
            futures = await self.publish_outputs(outputs, message, self._id_base(message, sequence))
        except RoutingError as exc:
            await self.reject(message, sequence, attempt, exc)
            return None
        except RetryableError as exc:
            await self.retry_later(
                message, sequence, attempt, str(exc), reason="route", retry_after=exc.retry_after
            )
            return None
        if futures is None:
            await self._settle_without_outputs(message, outputs)
            return None
        return futures, outputs, time.monotonic()

    async def _outputs_of(self, message: Delivery, context: MessageContext | None) -> list[Output]:
        if self.route.is_async:
            return await self.route.process_async(message.data, context, self.services)
        return self.route.process(message.data, context)  # a synchronous route's suspect

    def _id_base(self, message: Delivery, sequence: str) -> str:
        """`<stream>:<sequence>` of the input, which names its outputs; for a replayed dead
        letter, the place of the input the route first failed on (the same ids again)."""
        headers = message.headers
        if headers:
            origin = headers.get(REPLAY_ORIGIN_HEADER)
            if origin:
                return origin
        return self._id_prefix + sequence

    async def _settle_without_outputs(self, message: Delivery, outputs: list[Output]) -> None:
        if not outputs:
            self.stats.filtered += 1
        await self.settle(message, ACK)

    async def reject(
        self, message: Delivery, sequence: str, attempt: int, error: RoutingError
    ) -> None:
        """Retry a transient routing error; dead-letter a permanent one with where and why.

        The route's `retry.permanent` / `retry.transient` lists override by error kind.
        """
        if self.retry.is_transient(error.kind, default=error.transient):
            await self.retry_later(message, sequence, attempt, str(error), reason=error.kind)
            return
        await self.dead_letter(
            message,
            sequence,
            attempt,
            reason=error.kind,
            error=str(error),
            extra_headers=error.dead_letter_headers(),
        )

    async def publish_outputs(
        self, outputs: list[Output], message: Delivery, id_base: str
    ) -> _Futures | None:
        """Publish `outputs` without waiting; the PubAck futures of the OUT ones (None if none).

        Ids are `<id_base>:<route>:<index>`; replies go out on core NATS at once.
        """
        if not outputs:
            return None
        inherited = message.headers
        hop = self.hops.next_hop(inherited) if self.hops is not None else None
        id_base += self._id_suffix
        indexes = self._indexes
        futures: _Futures = []
        js = self.js
        for index, (kind, subject, body, extra) in enumerate(outputs):
            headers = passthrough_headers(inherited) if inherited else None
            if extra:
                headers = {**headers, **extra} if headers else dict(extra)
            if hop:
                headers = {**headers, **hop} if headers else dict(hop)
            if kind == REPLY:
                await self._reply(subject, body, headers or {})
                continue
            message_id = id_base + (indexes[index] if index < 64 else str(index))
            # Never raises: a publish that could not be sent is a failed future.
            future = await publish_output(js, subject, body, message_id, headers)
            if kind == OUT:
                futures.append(future)
            else:
                future.add_done_callback(self._tap_done)
        return futures or None

    async def publish_side(self, outputs: list[Output], message: Delivery, id_base: str) -> None:
        """Publish outputs an aggregate input yields beside its group; not waited for."""
        await self.publish_outputs(outputs, message, id_base)

    async def publish_group(
        self, outputs: list[Output], headers_from: Delivery, id_base: str
    ) -> tuple[int, Exception | None]:
        """Publish an aggregate's outputs and wait for their PubAcks (see `AggregatorHost`)."""
        futures = await self.publish_outputs(outputs, headers_from, id_base)
        if not futures:
            return 0, None
        deadline = time.monotonic() + self.publish_timeout
        return len(futures), await self.await_all(futures, outputs, deadline)

    async def confirm_acks(self) -> None:
        """Return once the server has every ack sent so far (a flush); BusUnavailable if not."""
        await flush(self.client, self.publish_timeout)

    async def _reply(self, inbox: str, body: bytes, headers: dict[str, str]) -> None:
        try:
            await publish_core(self.client, inbox, body, headers=headers)
        except BusUnavailable as exc:
            # The requester times out and answers its caller; the message itself is fine.
            self.stats.count_error("reply")
            self.logger.warning("could not reply to %s: %s", inbox, exc)

    def _tap_done(self, future: asyncio.Future[PubAck]) -> None:
        if not future.cancelled() and future.exception() is not None:
            self.stats.count_error("wiretap")
            self.logger.warning("wiretap copy not stored: %s", future.exception())

    async def _settle_in_order(self) -> None:
        pending = self._pending
        wake = self._wake
        stats = self.stats
        observe = stats.latency.observe
        timeout = self.publish_timeout
        while True:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            message, published, sequence, attempt, received = pending.popleft()
            try:
                if isinstance(published, asyncio.Future):
                    resolved = await published
                    if resolved is None:
                        continue
                    published = resolved
                futures, outputs, published_at = published
                error = await self.await_all(futures, outputs, published_at + timeout)
                if error is None:
                    stats.published += len(futures)
                    observe(time.monotonic() - received)
                    if attempt > 1:
                        self.forget_error(sequence)
                    if self.refusals.active:
                        for output in outputs:
                            self.refusals.stored(output.subject)
                    await self.settle(message, ACK)
                else:
                    self.note_publish_failure(error)
                    await self.retry_later(message, sequence, attempt, str(error), reason="publish")
            except Exception as exc:
                # A bug here must not end the settler (and every later ack with it). The
                # outputs may be stored: retry, their message ids make a second pass harmless.
                await self.fail_unexpected(message, exc, retry=True)

    @staticmethod
    async def await_all(
        futures: _Futures, outputs: list[Output], deadline: float
    ) -> Exception | None:
        """Wait for every PubAck until `deadline` (monotonic, counted from the publish, not
        from when the settler got here); the first failure, or None when all are stored."""
        for index, future in enumerate(futures):
            try:
                if future.done() and not future.cancelled() and future.exception() is None:
                    continue
                remaining = max(0.0, deadline - time.monotonic())
                await await_pub_ack(future, outputs[index].subject, remaining)
            except Exception as exc:
                return exc
        return None
