"""The `amqp` source's and sink's config keys; importable without aio-pika.

    [[sources]]
    name = "orders-in"
    type = "amqp"
    url = "amqp://busway:${RABBIT_PASSWORD}@rabbit:5672/shop"
    queue = "orders"
    subject = "rabbit.orders"

    [[sinks]]
    name = "orders-out"
    type = "amqp"
    from = "orders.>"
    url = "amqp://busway:${RABBIT_PASSWORD}@rabbit:5672/shop"
    exchange = "orders"
    routing_key = "{subject}"

Kept apart from the client code so that `busway schema` documents both and `busway check`
decodes them whether or not the `amqp` extra is installed.
"""

from __future__ import annotations

from typing import Annotated, Literal
from urllib.parse import urlsplit, urlunsplit

import msgspec

from busway import Duration, SinkConfig, SourceConfig

__all__ = ["AmqpSinkConfig", "AmqpSourceConfig", "check_url", "safe_url"]

Prefetch = Annotated[int, msgspec.Meta(ge=1, le=65_535)]


def safe_url(url: str) -> str:
    """`url` with its password masked, for logs and errors (never show a secret)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def check_url(url: str) -> None:
    """ValueError (without the password) unless `url` is an amqp:// or amqps:// URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError(f"url {safe_url(url)!r} is not a valid URL") from None
    if parts.scheme not in ("amqp", "amqps"):
        raise ValueError(
            f"url {safe_url(url)!r} must start with amqp:// or amqps:// "
            "(amqp://user:password@host:5672/vhost)"
        )
    if not parts.hostname:
        raise ValueError(f"url {safe_url(url)!r} names no host")
    if port == 0:
        raise ValueError(f"url {safe_url(url)!r}: port 0 is not a port")


def _check_connection(url: str, connect_timeout: float, startup_timeout: float) -> None:
    check_url(url)
    if not connect_timeout > 0:
        raise ValueError("connect_timeout must be more than 0s")
    if not startup_timeout >= 0:
        raise ValueError("startup_timeout must be 0s or more")


class AmqpSourceConfig(SourceConfig, frozen=True, kw_only=True, tag="amqp"):
    """Consume one RabbitMQ (AMQP 0-9-1) queue into JetStream; each delivery is acked to the
    broker only after JetStream stored it."""

    url: str
    """`amqp://user:password@host:5672/vhost` (`amqps://` for TLS; `%2F` is the vhost `/`).
    Put the password in `${ENV}` or `${file:...}`; it is never logged."""
    queue: str
    """The queue to consume, with manual acks."""
    declare: bool = False
    """Declare `queue` (durable, no arguments) if it does not exist; by default it must
    exist already (its owner sets its arguments: dead-letter exchange, type, limits)."""
    prefetch: Prefetch = 256
    """Deliveries held un-acked at once (basic.qos): the back-pressure bound towards
    RabbitMQ; they are in flight towards JetStream, pipelined."""
    format: Literal["bytes", "json"] = "bytes"
    """`json`: every message must be JSON (content type absent, `application/json` or
    `*+json`; no content encoding but `identity`/`utf-8`; a body that parses); any other goes
    to `on_malformed`. `bytes`: bodies are taken as they are."""
    on_malformed: Literal["dead-letter", "reject"] = "dead-letter"
    """A malformed message (see `format`, `require_message_id`): `dead-letter` stores it in
    busway's dead letters (reason `malformed`) and acks it; `reject` rejects it without
    requeue, so RabbitMQ moves it to the queue's dead-letter exchange (or drops it when the
    queue has none)."""
    require_message_id: bool = False
    """Treat a message without the `message_id` property as malformed instead of naming it
    by a hash of its content (see "Message ids" in the docs)."""
    connect_timeout: Duration = Duration(10.0)
    """Longest wait for one connection attempt (TCP, TLS and the AMQP handshake)."""
    startup_timeout: Duration = Duration(0.0)
    """How long start-up keeps retrying an unreachable broker, with back-off, before the
    daemon refuses to start; `0s` (the default) refuses at once with a one-line error.
    After start-up a lost connection is always retried."""

    def __post_init__(self) -> None:
        _check_connection(self.url, float(self.connect_timeout), float(self.startup_timeout))
        if not self.queue or len(self.queue.encode()) > 255:
            raise ValueError("queue must be 1 to 255 bytes long")


class AmqpSinkConfig(SinkConfig, frozen=True, kw_only=True, tag="amqp"):
    """Publish each message to a RabbitMQ exchange with publisher confirms and `mandatory`;
    the JetStream message is acked only after the broker confirmed it."""

    url: str
    """`amqp://user:password@host:5672/vhost` (`amqps://` for TLS; `%2F` is the vhost `/`).
    Put the password in `${ENV}` or `${file:...}`; it is never logged."""
    exchange: str = ""
    """The exchange to publish to (`""`: the default exchange, which routes to the queue
    named by the routing key). A template like `routing_key`; a named exchange must exist."""
    routing_key: str = "{subject}"
    """The routing key, a template: `{subject}`, `{subject[N]}`, `{id}`, `{header.Name}`,
    `{body.path.to.field}` (see the HTTP sink's templates)."""
    persistent: bool = True
    """Publish with delivery mode 2, so that durable queues keep the message across a broker
    restart; `false` for transient messages (faster, lost on a restart)."""
    confirm_timeout: Duration = Duration(10.0)
    """Longest wait for the broker's confirm of a batch; unconfirmed messages are retried
    (consumers dedupe on the `message_id` property)."""
    connect_timeout: Duration = Duration(10.0)
    """Longest wait for one connection attempt (TCP, TLS and the AMQP handshake)."""
    startup_timeout: Duration = Duration(0.0)
    """How long start-up keeps retrying an unreachable broker, with back-off, before the
    daemon refuses to start; `0s` (the default) refuses at once with a one-line error.
    After start-up an outage fails deliveries as retryable (the circuit breaker pauses)."""

    def __post_init__(self) -> None:
        _check_connection(self.url, float(self.connect_timeout), float(self.startup_timeout))
        if not self.confirm_timeout > 0:
            raise ValueError("confirm_timeout must be more than 0s")
