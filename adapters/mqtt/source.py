"""The `mqtt` source: subscribe with QoS 1 in a persistent session, publish each message into
JetStream, acknowledge it to the broker (PUBACK) only after JetStream's PubAck.

Until the PUBACK the broker keeps the message; if busway stops or the connection breaks
before it, the broker delivers it again when busway's session reconnects. Messages are
published pipelined (up to `max_in_flight` awaiting their PubAck) and acknowledged in the
order they came, as MQTT requires. A failed publish acknowledges nothing: the source drops
the connection, backs off and reconnects, and the broker sends the unacknowledged messages
again (its ids make the copies that were stored after all harmless).

Input that cannot become a message (a topic with no subject, a payload over `max_payload`,
not JSON when `payload = "json"`) is dead-lettered with its reason, then acknowledged.

One daemon at a time holds the session (an MQTT client id connects once): the others stand
by on the source's lease and take over when the holder dies.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Awaitable

import anyio
import orjson
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from busway import PublishAck, PublishError, Source, SourceContext, StartupError
from busway.adapters.mqtt._client import BrokerRefused, BrokerUnavailable, Received, Session
from busway.adapters.mqtt._config import MqttSourceConfig
from busway.adapters.mqtt._topics import topic_to_subject

__all__ = ["MqttSource"]

_SETTLE_TIMEOUT = 15.0

Pending = tuple[Received, Awaitable[PublishAck] | None]
"""A message taken, and its PubAck to await (None: already stored, e.g. dead-lettered)."""


class MqttSource(Source):
    """Publishes the messages of an MQTT broker's topics into JetStream."""

    def __init__(self, config: MqttSourceConfig) -> None:
        self.config = config

    def _session(self) -> Session:
        connection = self.config.connection
        return Session(
            connection,
            client_id=connection.client_id or f"busway-{self.config.name}",
            persistent=True,
            session_expiry=float(self.config.session_expiry),
            manual_ack=True,
            max_inflight=self.config.max_in_flight,
        )

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Check the broker takes our login, then hold the session while leader."""
        probe = self._session()
        try:
            await probe.open()
            await probe.subscribe(self.config.topics)  # the session now queues for us
        except (BrokerRefused, BrokerUnavailable) as exc:
            if isinstance(exc, BrokerRefused) or not self.config.connection.wait_for_broker:
                raise StartupError(f"source {self.config.name!r}: {exc}") from None
            context.logger.warning("%s; retrying in the background", exc)
        finally:
            # A standby daemon must not hold the client id: the leader connects again.
            await probe.close()
        task_status.started()
        while True:
            async with context.lease(ttl=float(self.config.lease_ttl)):
                await self._hold(context)
            context.stats.ready = False
            context.logger.warning("lost the lease of the MQTT session; standing by")

    async def _hold(self, context: SourceContext) -> None:
        """Connect, pump, reconnect with back-off, until cancelled (the lease was lost)."""
        backoff = 0.0
        while True:
            session = self._session()
            try:
                await session.open()
                await session.subscribe(self.config.topics)
                context.stats.ready = True
                if backoff:
                    context.logger.info("connected to MQTT broker %s again", session.where)
                backoff = 0.0
                await self._pump(context, session)
            except* (BrokerUnavailable, PublishError) as group:
                exc = group.exceptions[0]
                reason = "publish" if isinstance(exc, PublishError) else "broker"
                backoff = min(float(self.config.connection.reconnect_max), backoff * 2 or 0.2)
                context.stats.ready = False
                context.stats.count_error(reason)
                context.stats.note_error(str(exc))
                context.logger.warning("%s; reconnecting in %.1fs", exc, backoff)
            finally:
                with anyio.CancelScope(shield=True):
                    await session.close()
            await anyio.sleep(backoff)

    async def _pump(self, context: SourceContext, session: Session) -> None:
        """Publish each message as it comes; an acker task PUBACKs them in order."""
        send, receive = anyio.create_memory_object_stream[Pending](self.config.max_in_flight)
        # Closed here too: if the pump is cancelled before the acker starts, nobody else would.
        with send, receive:
            await self._pump_into(context, session, send, receive)

    async def _pump_into(
        self,
        context: SourceContext,
        session: Session,
        send: MemoryObjectSendStream[Pending],
        receive: MemoryObjectReceiveStream[Pending],
    ) -> None:
        async with anyio.create_task_group() as tg, send:
            tg.start_soon(self._acknowledge, context, session, receive)
            async for message in session.messages():
                context.stats.received += 1
                stored = await self._publish(context, message)
                try:
                    await send.send((message, stored))
                except BaseException:
                    await _settle([stored])
                    raise
            # The connection ended: what was published but not acknowledged comes again.
            raise BrokerUnavailable(f"MQTT broker {session.where} closed the connection")

    async def _acknowledge(
        self,
        context: SourceContext,
        session: Session,
        receive: MemoryObjectReceiveStream[Pending],
    ) -> None:
        try:
            async for message, stored in receive:
                if stored is not None:
                    await stored  # PublishError: nothing more is acknowledged
                    context.stats.published += 1
                session.ack(message)
        finally:
            # Left unacknowledged: the broker sends them again.
            left: list[Awaitable[PublishAck] | None] = []
            while True:
                try:
                    left.append(receive.receive_nowait()[1])
                except (anyio.WouldBlock, anyio.EndOfStream):
                    break
            receive.close()
            await _settle(left)

    async def _publish(
        self, context: SourceContext, message: Received
    ) -> Awaitable[PublishAck] | None:
        """Send `message` to JetStream (its PubAck to await), or dead-letter it (None)."""
        name = self.config.name
        problem = self._problem(message)
        message_id = self._message_id(message)
        if problem is not None:
            reason, error = problem
            await context.dead_letter(
                message.payload,
                reason=reason,
                error=error,
                origin=f"mqtt {self.config.connection.url} topic {message.topic[:200]!r}",
                message_id=message_id.removeprefix(f"{name}:"),
            )
            context.logger.warning("dead-lettered a message from %r: %s", message.topic, error)
            return None
        subject = self.config.subject.replace("{topic}", topic_to_subject(message.topic))
        headers = {"Nats-Msg-Id": message_id, "Mqtt-Topic": message.topic}
        if message.retain:
            headers["Mqtt-Retain"] = "true"
        return await context.publisher.publish_pipelined(subject, message.payload, headers=headers)

    def _problem(self, message: Received) -> tuple[str, str] | None:
        """(reason, error) when `message` cannot be published, else None."""
        try:
            topic_to_subject(message.topic)
        except ValueError as exc:
            return "topic", f"{exc}: it has no NATS subject"
        if len(message.payload) > self.config.max_payload:
            return "too_large", (
                f"payload of {len(message.payload)} bytes is over max_payload "
                f"({self.config.max_payload})"
            )
        if self.config.payload == "json":
            try:
                orjson.loads(message.payload)
            except orjson.JSONDecodeError as exc:
                return "malformed", f"payload is not JSON ({exc})"
        return None

    def _message_id(self, message: Received) -> str:
        """`<source>:<digest>`: see `ids` and `id_property` in the config."""
        name = self.config.name
        given = (
            message.user_properties.get(self.config.id_property)
            if self.config.id_property
            else None
        )
        if given is not None:
            key = b"p\x00" + message.topic.encode() + b"\x00" + given.encode()
        elif self.config.ids == "unique":
            return f"{name}:{uuid.uuid4().hex}"
        else:
            key = b"c\x00" + message.topic.encode() + b"\x00" + message.payload
        return f"{name}:{hashlib.sha256(key).hexdigest()[:40]}"


async def _settle(pending: list[Awaitable[PublishAck] | None]) -> None:
    """Await PubAcks nobody will use, ignoring their outcome: an abandoned one would leave
    nats-py's future with an exception never retrieved (and a coroutine never awaited)."""
    with anyio.move_on_after(_SETTLE_TIMEOUT, shield=True):
        for stored in pending:
            if stored is not None:
                with contextlib.suppress(Exception):
                    await stored
