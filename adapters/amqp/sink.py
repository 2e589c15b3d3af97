"""The `amqp` sink: each message to a RabbitMQ exchange, acked in JetStream after the confirm.

    [[sinks]]
    name = "orders-out"
    type = "amqp"
    from = "orders.>"
    url = "amqp://busway:${RABBIT_PASSWORD}@rabbit:5672/shop"
    exchange = "orders"
    routing_key = "{subject[1]}.{body.region}"

Each batch is published on one channel with publisher confirms, every message `mandatory`
and with the AMQP `message_id` set to busway's message id (stable across redeliveries and
replays: consumers dedupe on it, since RabbitMQ itself does not). The batch's publishes are
pipelined; `write` returns once every confirm arrived, and only then does the engine ack the
JetStream messages. Per message:

    confirmed (basic.ack)              delivered: acked in JetStream
    returned (basic.return)            Unroutable, a PermanentError: dead letter `unroutable`
    nacked (basic.nack)                Nacked, retried with back-off (reason `nacked`)
    no confirm within confirm_timeout  Unconfirmed, retried (reason `unconfirmed`)
    exchange missing                   NoExchange, retried, then dead letter (`no_exchange`)
    template cannot be filled          PermanentError: dead letter
    connection lost / broker down      RetryableError for the whole batch; `ready()` false;
                                       the engine's circuit breaker pauses delivery, and the
                                       next write reconnects
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import anyio

from busway import (
    BatchError,
    BuildContext,
    ConfigError,
    DeliveryError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
)
from busway.adapters._template import Fields as MessageFields
from busway.adapters._template import Template, no_line_breaks
from busway.adapters.amqp._client import (
    AbstractChannel,
    AbstractConnection,
    BrokerUnreachable,
    NoExchange,
    connect,
    connect_at_start,
    exchange_exists,
    open_confirming_channel,
    publish,
)
from busway.adapters.amqp._config import AmqpSinkConfig, safe_url

__all__ = ["AmqpSink", "create_sink"]

logger = logging.getLogger("busway.adapters.amqp")

_KNOWN_EXCHANGES = 1024
"""Exchange names remembered as existing (templated exchanges); beyond it, checked again."""


def _template(text: str, key: str) -> Template:
    try:
        return Template.compile(text, escape=no_line_breaks(f"the {key}"), where=f"$.{key}")
    except ValueError as exc:
        raise ConfigError(str(exc), path=f"$.{key}") from None


class AmqpSink(Sink):
    """Publishes batches with confirms; see the module docstring for each outcome."""

    def __init__(self, config: AmqpSinkConfig) -> None:
        self.config = config
        self._exchange = _template(config.exchange, "exchange")
        self._routing_key = _template(config.routing_key, "routing_key")
        self._where = f"amqp sink {config.name!r} ({safe_url(config.url)})"
        self._connection: AbstractConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchanges: set[str] = {""}
        self._healthy = True

    async def open(self) -> None:
        """Connect (StartupError if the broker cannot be reached or refuses the login, after
        `startup_timeout`) and check a literal exchange exists."""
        self._connection = await connect_at_start(
            self.config.url,
            timeout=float(self.config.connect_timeout),
            startup_timeout=float(self.config.startup_timeout),
            logger=logger,
            what=self._where,
        )
        if self._exchange.is_static and self.config.exchange:
            from busway import StartupError

            if not await exchange_exists(self._connection, self.config.exchange):
                await self.close()
                raise StartupError(
                    f"{self._where}: exchange {self.config.exchange!r} does not exist: "
                    "declare it in RabbitMQ (busway publishes, it does not declare topology)"
                )
            self._exchanges.add(self.config.exchange)

    async def close(self) -> None:
        """Close the connection (a second call does nothing)."""
        connection, self._connection, self._channel = self._connection, None, None
        if connection is not None:
            with anyio.move_on_after(5, shield=True):
                await connection.close()

    def ready(self) -> bool:
        """False after a lost connection or failed reconnect, until a write succeeds again."""
        return self._healthy

    async def _ready_channel(self) -> AbstractChannel:
        """The confirming channel, reconnecting first if the connection or channel is gone."""
        if self._channel is not None and not self._channel.is_closed:
            return self._channel
        if self._connection is None or self._connection.is_closed:
            await self.close()
            self._connection = await connect(
                self.config.url, timeout=float(self.config.connect_timeout)
            )
            logger.info("%s: connected to RabbitMQ", self._where)
        self._channel = await open_confirming_channel(self._connection)
        return self._channel

    async def write(self, batch: Sequence[Message]) -> None:
        """Publish every message of `batch` and wait for every confirm (see module docstring)."""
        failures: dict[int, DeliveryError] = {}
        targets: dict[str, tuple[int, str, str]] = {}  # message id -> first index, exchange, key
        twins: dict[int, int] = {}  # a repeated id in one batch: published once
        for index, message in enumerate(batch):
            fields = MessageFields(message)
            try:
                exchange = self._exchange.render(fields)
                routing_key = self._routing_key.render(fields)
            except PermanentError as exc:
                failures[index] = exc
                continue
            if len(routing_key.encode()) > 255 or len(exchange.encode()) > 255:
                failures[index] = PermanentError(
                    f"message {message.id}: exchange or routing key longer than 255 bytes"
                )
                continue
            if message.id in targets:
                twins[index] = targets[message.id][0]
            else:
                targets[message.id] = (index, exchange, routing_key)
        try:
            channel = await self._ready_channel()
            missing = await self._missing_exchanges({e for _, e, _ in targets.values()})
        except RetryableError as exc:
            self._healthy = False
            await self.close()
            if not failures:
                raise
            failures.update(dict.fromkeys((i for i, _, _ in targets.values()), exc))
            failures.update(dict.fromkeys(twins, exc))
            raise BatchError(failures) from None
        sends = [
            (index, exchange, key)
            for index, exchange, key in targets.values()
            if exchange not in missing
        ]
        for index, exchange, _ in targets.values():
            if exchange in missing:
                failures[index] = NoExchange(
                    f"message {batch[index].id}: exchange {exchange!r} does not exist"
                )
        outcomes = await asyncio.gather(
            *(
                self._publish(channel, batch[index], exchange, key)
                for index, exchange, key in sends
            ),
            return_exceptions=True,
        )
        lost = False
        for (index, _, _), outcome in zip(sends, outcomes, strict=True):
            if isinstance(outcome, DeliveryError):
                failures[index] = outcome
                lost = lost or isinstance(outcome, BrokerUnreachable)
            elif isinstance(outcome, BaseException):
                raise outcome
        for twin, first in twins.items():
            if first in failures:
                failures[twin] = failures[first]
        if lost:
            self._healthy = False
            await self.close()
        elif len(failures) < len(batch):
            self._healthy = True
        if not failures:
            return
        if len(failures) == len(batch) and all(
            isinstance(error, BrokerUnreachable) for error in failures.values()
        ):
            # The broker is down: one error for the batch, naming no one message.
            raise BrokerUnreachable(f"{self._where}: connection to RabbitMQ lost")
        raise BatchError(failures)

    async def _missing_exchanges(self, names: set[str]) -> set[str]:
        unknown = names - self._exchanges
        if not unknown:
            return set()
        assert self._connection is not None
        missing: set[str] = set()
        for name in unknown:
            if await exchange_exists(self._connection, name):
                if len(self._exchanges) >= _KNOWN_EXCHANGES:
                    self._exchanges = {""}
                self._exchanges.add(name)
            else:
                missing.add(name)
        return missing

    async def _publish(
        self, channel: AbstractChannel, message: Message, exchange: str, routing_key: str
    ) -> None:
        headers = {k: v for k, v in message.headers.items() if not k.lower().startswith("nats-")}
        content_type = next(
            (v for k, v in message.headers.items() if k.lower() == "content-type"), None
        )
        await publish(
            channel,
            exchange=exchange,
            routing_key=routing_key,
            body=message.data,
            headers=headers,
            message_id=message.id,
            content_type=content_type,
            persistent=self.config.persistent,
            timeout=float(self.config.confirm_timeout),
        )


def create_sink(config: AmqpSinkConfig, context: BuildContext) -> AmqpSink:
    """The sink of a `type = "amqp"` config (no I/O here)."""
    return AmqpSink(config)
