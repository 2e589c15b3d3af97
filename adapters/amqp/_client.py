"""The one module that imports aio-pika: connecting, and aio-pika's errors translated into busway's.

    connect()          one connection attempt, errors as busway's:
                         LoginRefused      the broker refused the user or password (or vhost)
                         BrokerUnreachable nothing answered, or the handshake did not finish
    connect_at_start() attempts with back-off until `startup_timeout`, then a StartupError
                       that says in one line what was tried and what to do
    translated()       aio-pika / aiormq errors of an operation as RetryableError

Passwords never reach a log or an error: URLs are shown through `safe_url`, and the client
library's own messages (which can repeat the URL) are not passed on for connection failures.

Why plain connections and our own reconnect loop, not aio-pika's robust connection: a robust
connection restores channels and consumers in the background, but a publish during the outage
fails anyway (aio-pika's own docs say so) and the delivery tags of restored consumers start
again, so the source and sink must handle the outage themselves in any case; doing it in one
place (`AmqpSource._run_sessions`, `AmqpSink._channel`) keeps readiness, back-off and the
circuit breaker exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

try:
    import aio_pika
    import aiormq
    import aiormq.exceptions
    from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the amqp adapter needs aio-pika ({exc}): pip install 'busway[amqp]'"
    ) from exc

from busway import PermanentError, RetryableError, StartupError
from busway.adapters.amqp._config import safe_url

__all__ = [
    "AbstractChannel",
    "AbstractConnection",
    "AbstractIncomingMessage",
    "BrokerUnreachable",
    "LoginRefused",
    "Nacked",
    "NoExchange",
    "Unconfirmed",
    "Unroutable",
    "backoff_delays",
    "check_queue",
    "connect",
    "connect_at_start",
    "exchange_exists",
    "on_consumer_cancel",
    "open_confirming_channel",
    "publish",
    "quietly",
    "translated",
]


def _not_a_failed_connect(record: logging.LogRecord) -> bool:
    """aiormq logs every failed connection attempt at ERROR; `connect` reports it once, with
    what to do, so that line is dropped (aiormq's other records pass)."""
    return not str(record.msg).startswith("error when creating transport")


logging.getLogger("aiormq.connection").addFilter(_not_a_failed_connect)


class BrokerUnreachable(RetryableError):
    """No AMQP connection: refused, timed out, reset, or the broker is shutting down."""


class Unroutable(PermanentError):
    """The broker returned a `mandatory` message (basic.return): no queue is bound for it."""

    reason = "unroutable"


class Nacked(RetryableError):
    """The broker nacked the message (an internal error, a full queue with reject-publish)."""

    reason = "nacked"


class Unconfirmed(RetryableError):
    """No confirm within `confirm_timeout`: the broker may or may not have the message."""

    reason = "unconfirmed"


class NoExchange(RetryableError):
    """The exchange a message is for does not exist (yet): retried, then dead-lettered."""

    reason = "no_exchange"


class LoginRefused(RetryableError):
    """The broker refused the login (user, password or vhost); retried after start-up, since
    an operator may fix the account, but fatal at start-up."""


def backoff_delays(first: float = 0.5, most: float = 30.0) -> Iterator[float]:
    """Exponential back-off with ±20 % jitter: 0.5s, 1s, 2s ... `most`."""
    delay = first
    while True:
        yield delay * random.uniform(0.8, 1.2)
        delay = min(most, delay * 2)


async def connect(url: str, *, timeout: float) -> AbstractConnection:
    """One connection attempt to `url`; LoginRefused or BrokerUnreachable if it fails."""
    where = safe_url(url)
    try:
        return await aio_pika.connect(url, timeout=timeout)
    except (aiormq.exceptions.AuthenticationError, aiormq.exceptions.ProbableAuthenticationError):
        raise LoginRefused(
            f"RabbitMQ at {where} refused the login: check the user, password and vhost in `url`"
        ) from None
    except aiormq.exceptions.ConnectionNotAllowed:
        raise LoginRefused(
            f"RabbitMQ at {where} refused access to the vhost: grant the user permissions on it"
        ) from None
    except TimeoutError:
        raise BrokerUnreachable(
            f"RabbitMQ at {where} did not complete the connection within {timeout:g}s"
        ) from None
    except (OSError, aiormq.exceptions.AMQPError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise BrokerUnreachable(f"RabbitMQ at {where} is not reachable ({reason})") from None


async def connect_at_start(
    url: str,
    *,
    timeout: float,
    startup_timeout: float,
    logger: logging.Logger,
    what: str,
) -> AbstractConnection:
    """Connect, retrying with back-off for up to `startup_timeout`; else a one-line
    StartupError (a refused login fails at once: waiting cannot fix a password)."""
    deadline = time.monotonic() + startup_timeout
    delays = backoff_delays()
    while True:
        try:
            return await connect(url, timeout=timeout)
        except LoginRefused as exc:
            raise StartupError(f"{what}: {exc}") from None
        except BrokerUnreachable as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                hint = (
                    "start it, fix `url`, or set `startup_timeout` to wait for it"
                    if startup_timeout == 0
                    else f"gave up after startup_timeout = {startup_timeout:g}s"
                )
                raise StartupError(f"{what}: {exc}; {hint}") from None
            delay = min(left, next(delays))
            logger.warning("%s: %s; retrying in %.1fs", what, exc, delay)
            await asyncio.sleep(delay)


@contextlib.contextmanager
def translated(what: str) -> Iterator[None]:
    """aio-pika / aiormq errors of an operation on an open connection as RetryableError."""
    try:
        yield
    except (aiormq.exceptions.AMQPConnectionError, ConnectionError) as exc:
        raise BrokerUnreachable(f"{what}: connection to RabbitMQ lost ({exc!r})") from None
    except aiormq.exceptions.ChannelInvalidStateError as exc:
        raise BrokerUnreachable(f"{what}: channel closed ({exc})") from None
    except aiormq.exceptions.AMQPError as exc:
        raise RetryableError(f"{what}: {exc!r}") from None


async def check_queue(
    connection: AbstractConnection, queue: str, *, declare: bool, what: str
) -> None:
    """StartupError unless `queue` exists (declared durable first with `declare`)."""
    try:
        channel = await connection.channel()
        await channel.declare_queue(queue, durable=True, passive=not declare)
        await channel.close()
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise StartupError(
            f"{what}: the queue does not exist: declare it in RabbitMQ, or set `declare = true`"
        ) from None
    except aiormq.exceptions.ChannelAccessRefused:
        raise StartupError(
            f"{what}: access to the queue refused: grant the user read permission on it "
            "(and configure permission with declare = true)"
        ) from None
    except aiormq.exceptions.ChannelPreconditionFailed:
        raise StartupError(
            f"{what}: the queue exists with other arguments than `declare = true` gives it "
            "(durable, no arguments): set `declare = false`"
        ) from None
    except (aiormq.exceptions.AMQPError, ConnectionError) as exc:
        raise StartupError(f"{what}: checking the queue failed: {exc!r}") from None


async def quietly(answer: Awaitable[Any]) -> None:
    """Send an ack or reject; on a closed channel RabbitMQ requeues the delivery itself, so
    the failure to answer is no loss."""
    with contextlib.suppress(
        aiormq.exceptions.AMQPError, aiormq.exceptions.ChannelInvalidStateError, ConnectionError
    ):
        await answer


async def open_confirming_channel(connection: AbstractConnection) -> AbstractChannel:
    """A channel with publisher confirms on, where an unroutable `mandatory` message fails
    its own publish (aiormq matches the return to it by `message_id`)."""
    with translated("opening a channel"):
        return await connection.channel(publisher_confirms=True, on_return_raises=True)


async def exchange_exists(connection: AbstractConnection, name: str) -> bool:
    """Whether exchange `name` exists (a passive declare, on a channel of its own because a
    404 closes the channel it happens on)."""
    with translated(f"checking exchange {name!r}"):
        channel = await connection.channel(publisher_confirms=False)
        try:
            await channel.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return False
        finally:
            if not channel.is_closed:
                await channel.close()
        return True


async def publish(
    channel: AbstractChannel,
    *,
    exchange: str,
    routing_key: str,
    body: bytes,
    headers: dict[str, str],
    message_id: str,
    content_type: str | None,
    persistent: bool,
    timeout: float,
) -> None:
    """Publish with `mandatory` and wait for the broker's confirm; busway's errors otherwise."""
    message = aio_pika.Message(
        body,
        headers=dict(headers),
        content_type=content_type,
        message_id=message_id,
        delivery_mode=(
            aio_pika.DeliveryMode.PERSISTENT if persistent else aio_pika.DeliveryMode.NOT_PERSISTENT
        ),
    )
    target = aio_pika.Exchange(channel, exchange) if exchange else channel.default_exchange
    where = f"message {message_id} to exchange {exchange or '(default)'!r} key {routing_key!r}"
    with translated(where):
        try:
            await target.publish(message, routing_key, mandatory=True, timeout=timeout)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(
                f"{where}: returned by RabbitMQ ({_reply_text(exc)}): no queue is bound for it"
            ) from None
        except aiormq.exceptions.DeliveryError:
            raise Nacked(f"{where}: nacked by RabbitMQ") from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise NoExchange(f"{where}: the exchange does not exist") from None
        except TimeoutError:
            raise Unconfirmed(f"{where}: not confirmed by RabbitMQ within {timeout:g}s") from None


def _reply_text(error: aiormq.exceptions.PublishError) -> str:
    delivery = getattr(error.message, "delivery", None)
    code = getattr(delivery, "reply_code", None)
    text = getattr(delivery, "reply_text", None)
    return f"{code} {text}" if code else str(text or "returned")


async def on_consumer_cancel(channel: AbstractChannel, notify: Callable[[], None]) -> None:
    """Call `notify` when the broker cancels a consumer of `channel` (the queue was deleted,
    or its node went away). Only a notification: aiormq runs this inside its frame reader,
    where closing the channel would wait for a reply the reader itself has to read."""
    underlay = await channel.get_underlay_channel()

    async def cancelled(frame: object) -> None:
        notify()

    underlay.on_consumer_cancel_callbacks.add(cancelled)
