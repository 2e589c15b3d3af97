"""The `amqp` source: one RabbitMQ queue into JetStream, acked to RabbitMQ after the PubAck.

    [[sources]]
    name = "orders-in"
    type = "amqp"
    url = "amqp://busway:${RABBIT_PASSWORD}@rabbit:5672/shop"
    queue = "orders"
    subject = "rabbit.orders"
    format = "json"

A delivery travels: consumer callback -> `_take` (id, headers, checks; publish pipelined)
-> `_settle` (await the PubAck, retrying with back-off while JetStream does not confirm; then
basic.ack). `prefetch` bounds the deliveries un-acked at RabbitMQ, and so everything held
here. Nothing is acked before JetStream stored it, so a crash, a lost connection or a
JetStream outage leaves the delivery to RabbitMQ, which redelivers it; the message id (see
`_inbound`) makes the second store a duplicate JetStream drops.

Every delivery is settled exactly once: acked after its PubAck (or after its dead letter's
PubAck), rejected without requeue (`on_malformed = "reject"`), or left un-acked when its
channel is gone (RabbitMQ requeues it; an ack on a dead channel would be meaningless).
"""

from __future__ import annotations

import contextlib
import inspect
import time
from collections.abc import Awaitable
from dataclasses import dataclass

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from busway import BuildContext, PublishAck, RetryableError, Source, SourceContext
from busway.adapters.amqp._client import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    BrokerUnreachable,
    backoff_delays,
    check_queue,
    connect,
    connect_at_start,
    on_consumer_cancel,
    quietly,
    translated,
)
from busway.adapters.amqp._config import AmqpSourceConfig, safe_url
from busway.adapters.amqp._inbound import Delivered, headers_of, malformed_reason, message_id

__all__ = ["AmqpSource", "create_source"]


@dataclass(slots=True)
class _Taken:
    """One delivery on its way: what to store, and the PubAck to wait for (None: not sent)."""

    incoming: AbstractIncomingMessage
    id: str
    data: bytes
    headers: dict[str, str]
    malformed: str | None
    stored: Awaitable[PublishAck] | None = None


class AmqpSource(Source):
    """Consumes `queue` with manual acks; see the module docstring for the delivery contract."""

    def __init__(self, config: AmqpSourceConfig) -> None:
        self.config = config
        self._where = (
            f"amqp source {config.name!r} ({safe_url(config.url)}, queue {config.queue!r})"
        )

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Connect (StartupError if the broker or queue cannot be used), then consume until
        cancelled, reconnecting with back-off whenever the connection is lost."""
        first = await connect_at_start(
            self.config.url,
            timeout=float(self.config.connect_timeout),
            startup_timeout=float(self.config.startup_timeout),
            logger=context.logger,
            what=self._where,
        )
        try:
            await check_queue(
                first, self.config.queue, declare=self.config.declare, what=self._where
            )
        except BaseException:
            with anyio.move_on_after(5, shield=True):
                await first.close()
            raise
        connection: AbstractConnection | None = first
        task_status.started()
        delays = backoff_delays()
        while True:
            try:
                if connection is None:
                    connection = await connect(
                        self.config.url, timeout=float(self.config.connect_timeout)
                    )
                    context.logger.info("connected to RabbitMQ again")
                delays = backoff_delays()
                await self._session(connection, context)
            except RetryableError as exc:
                context.stats.ready = False
                context.stats.count_error("unreachable")
                context.stats.note_error(str(exc))
                delay = next(delays)
                context.logger.warning("%s; reconnecting in %.1fs", exc, delay)
                await anyio.sleep(delay)
            finally:
                if connection is not None:
                    with anyio.move_on_after(5, shield=True):
                        await connection.close()
                connection = None

    async def _session(self, connection: AbstractConnection, context: SourceContext) -> None:
        """Consume on one connection until it is lost (RetryableError) or cancelled."""
        prefetch = self.config.prefetch
        received_send, received = anyio.create_memory_object_stream[AbstractIncomingMessage](
            prefetch
        )
        taken_send, taken = anyio.create_memory_object_stream[_Taken](prefetch)
        with translated(self._where):
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(self.config.queue, ensure=True)
            cancelled = anyio.Event()
            await on_consumer_cancel(channel, cancelled.set)

        async def hand_off(incoming: AbstractIncomingMessage) -> None:
            # The callback only hands off; `prefetch` bounds the deliveries, so this never waits.
            # Not taken (closing): RabbitMQ redelivers it when this channel closes.
            with contextlib.suppress(
                anyio.WouldBlock, anyio.ClosedResourceError, anyio.BrokenResourceError
            ):
                received_send.send_nowait(incoming)

        try:
            async with anyio.create_task_group() as tg, received_send, taken_send:
                tg.start_soon(self._take_all, received, taken_send.clone(), context)
                tg.start_soon(self._settle_all, taken, context)
                with translated(self._where):
                    await queue.consume(hand_off, no_ack=False)
                context.stats.ready = True
                await _until_closed(channel, cancelled)
                tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            retryable, other = group.split(RetryableError)
            if other is None and retryable is not None:
                raise _first(retryable) from None  # a lost connection, seen by a task
            raise
        raise BrokerUnreachable(
            f"{self._where}: channel closed (connection lost, or the broker cancelled the "
            "consumer: was the queue deleted?)"
        )

    async def _take_all(
        self,
        received: MemoryObjectReceiveStream[AbstractIncomingMessage],
        taken: MemoryObjectSendStream[_Taken],
        context: SourceContext,
    ) -> None:
        async with received, taken:
            async for incoming in received:
                item = await self._take(incoming, context)
                try:
                    await taken.send(item)
                except BaseException:
                    _discard(item)
                    raise

    async def _take(self, incoming: AbstractIncomingMessage, context: SourceContext) -> _Taken:
        """Name and check one delivery; send it to JetStream without waiting for the PubAck."""
        context.stats.received += 1
        delivered = _delivered(incoming)
        msg_id = message_id(context.name, delivered)
        item = _Taken(
            incoming=incoming,
            id=msg_id,
            data=delivered.body,
            headers=headers_of(delivered, msg_id),
            malformed=malformed_reason(
                delivered,
                json=self.config.format == "json",
                require_id=self.config.require_message_id,
            ),
        )
        if item.malformed is None:
            try:
                item.stored = await context.publisher.publish_pipelined(
                    self.config.subject, item.data, headers=item.headers
                )
            except RetryableError:
                item.stored = None  # `_settle` publishes it again, with back-off
        return item

    async def _settle_all(
        self, taken: MemoryObjectReceiveStream[_Taken], context: SourceContext
    ) -> None:
        with taken:
            try:
                async for item in taken:
                    await self._settle(item, context)
            finally:
                # Sent but never confirmed here: RabbitMQ redelivers them (the ids dedupe).
                while True:
                    try:
                        _discard(taken.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                        break

    async def _settle(self, item: _Taken, context: SourceContext) -> None:
        """Store `item` (or its dead letter) for sure, then settle it with RabbitMQ."""
        started = time.monotonic()
        if item.malformed is not None and self.config.on_malformed == "reject":
            context.stats.count_error("malformed")
            context.stats.note_error(f"malformed: {item.malformed} ({item.id}), rejected")
            context.stats.events["rejected"] = context.stats.events.get("rejected", 0) + 1
            context.logger.warning(
                "rejected message %s to the queue's DLX: %s", item.id, item.malformed
            )
            await quietly(item.incoming.reject(requeue=False))
            return
        delays = backoff_delays()
        while True:
            try:
                if item.malformed is not None:
                    await context.dead_letter(
                        item.data,
                        reason="malformed",
                        error=item.malformed,
                        origin=f"queue {self.config.queue}",
                        headers={k: v for k, v in item.headers.items() if k != "Nats-Msg-Id"},
                        message_id=item.id,
                    )
                    context.logger.warning("dead-lettered message %s: %s", item.id, item.malformed)
                else:
                    if item.stored is None:
                        item.stored = context.publisher.publish(
                            self.config.subject, item.data, headers=item.headers
                        )
                    await item.stored
                    context.stats.published += 1
                    context.stats.latency.observe(time.monotonic() - started)
                break
            except RetryableError as exc:
                item.stored = None
                context.stats.ready = False
                context.stats.count_error("retryable")
                context.stats.note_error(f"JetStream did not confirm {item.id}: {exc}")
                delay = next(delays)
                context.logger.warning(
                    "JetStream did not confirm message %s, retrying in %.1fs: %s",
                    item.id,
                    delay,
                    exc,
                )
                await anyio.sleep(delay)
        context.stats.ready = True
        await quietly(item.incoming.ack())


async def _until_closed(channel: AbstractChannel, cancelled: anyio.Event) -> None:
    """Return when `channel` closes or the broker cancels its consumer."""
    async with anyio.create_task_group() as watch:

        async def closed() -> None:
            await channel.closed()
            watch.cancel_scope.cancel()

        watch.start_soon(closed)
        await cancelled.wait()
        watch.cancel_scope.cancel()


def _discard(item: _Taken) -> None:
    """Drop `item` unsettled (its channel is gone), closing the PubAck wait nobody awaits."""
    if inspect.iscoroutine(item.stored):
        item.stored.close()


def _first(group: BaseExceptionGroup[BaseException]) -> BaseException:
    leaf: BaseException = group
    while isinstance(leaf, BaseExceptionGroup):
        leaf = leaf.exceptions[0]
    return leaf


def _delivered(incoming: AbstractIncomingMessage) -> Delivered:
    return Delivered(
        body=incoming.body,
        exchange=incoming.exchange or "",
        routing_key=incoming.routing_key or "",
        message_id=incoming.message_id,
        content_type=incoming.content_type,
        content_encoding=incoming.content_encoding,
        correlation_id=incoming.correlation_id,
        reply_to=incoming.reply_to,
        type=incoming.type,
        app_id=incoming.app_id,
        user_id=incoming.user_id,
        timestamp=incoming.timestamp,
        headers=dict(incoming.headers or {}),
        redelivered=bool(incoming.redelivered),
    )


def create_source(config: AmqpSourceConfig, context: BuildContext) -> AmqpSource:
    """The source of a `type = "amqp"` config (no I/O here)."""
    return AmqpSource(config)
