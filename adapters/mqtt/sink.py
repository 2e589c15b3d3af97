"""The `mqtt` sink: publish each message with QoS 1; the engine acks the JetStream message only
after the broker's PUBACK (`write` returns when every PUBACK of the batch arrived).

A batch is published pipelined (all messages sent, then every PUBACK awaited). A message the
broker did not confirm (connection lost, no PUBACK in `publish_timeout`) is reported retryable:
the engine naks it and delivers it again, so delivery is at least once; with MQTT 5 each
message carries its id as the user property `busway-message-id` for subscribers to drop copies.
A message that can never be delivered (larger than `max_payload`, a subject with no topic, an
MQTT 5 broker refusing it with a reason code) is permanent: it is dead-lettered with the reason.

The connection is made in `open()` and again, lazily, by the first `write` after it broke; the
engine's back-off and circuit breaker pace those attempts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from busway import (
    BatchError,
    DeliveryError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    StartupError,
)
from busway.adapters.mqtt._client import BrokerRefused, BrokerUnavailable, Session
from busway.adapters.mqtt._config import MqttSinkConfig
from busway.adapters.mqtt._topics import subject_to_topic

__all__ = ["MqttSink"]

logger = logging.getLogger("busway.adapters.mqtt")


class MqttSink(Sink):
    """Delivers messages to an MQTT broker with QoS 1."""

    def __init__(self, config: MqttSinkConfig) -> None:
        self.config = config
        self._session: Session | None = None
        self._connecting = asyncio.Lock()

    def _new_session(self) -> Session:
        connection = self.config.connection
        return Session(
            connection,
            client_id=connection.client_id or f"busway-{self.config.name}",
            persistent=False,
            max_inflight=max(20, self.config.batch_size),
        )

    async def open(self) -> None:
        """Connect; StartupError (one line, no password) unless `wait_for_broker`."""
        try:
            await self._connect()
        except (BrokerRefused, BrokerUnavailable) as exc:
            if isinstance(exc, BrokerRefused) or not self.config.connection.wait_for_broker:
                raise StartupError(f"sink {self.config.name!r}: {exc}") from None
            logger.warning("sink %r: %s; will connect at the first delivery", self.config.name, exc)

    async def _connect(self) -> Session:
        async with self._connecting:
            if self._session is not None and self._session.connected:
                return self._session
            if self._session is not None:
                await self._session.close()
                self._session = None
            session = self._new_session()
            await session.open()
            self._session = session
            return session

    async def write(self, batch: Sequence[Message]) -> None:
        """Publish every message of `batch`; BatchError names those that were not confirmed."""
        session = await self._connect()  # BrokerUnavailable: the whole batch is retried
        results = await asyncio.gather(*(self._publish(session, m) for m in batch))
        failures = {index: error for index, error in enumerate(results) if error is not None}
        if failures:
            if not session.connected:  # the next write connects afresh
                await session.close()
            raise BatchError(failures)

    async def _publish(self, session: Session, message: Message) -> DeliveryError | None:
        if len(message.data) > self.config.max_payload:
            return PermanentError(
                f"message {message.id}: {len(message.data)} bytes is over max_payload "
                f"({self.config.max_payload})"
            )
        topic = self.config.topic.replace("{subject}", subject_to_topic(message.subject))
        if not topic or "+" in topic or "#" in topic or "\x00" in topic:
            return PermanentError(
                f"message {message.id}: subject {message.subject!r} gives no valid topic "
                f"({topic!r})"
            )
        try:
            await session.publish(
                topic,
                message.data,
                retain=self.config.retain,
                timeout=float(self.config.publish_timeout),
                user_properties={"busway-message-id": message.id},
            )
        except BrokerRefused as exc:
            return PermanentError(f"message {message.id}: {exc}")
        except RetryableError as exc:
            return exc
        return None

    async def close(self) -> None:
        """Disconnect (harmless twice)."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def ready(self) -> bool:
        """False while not connected to the broker."""
        return self._session is not None and self._session.connected
