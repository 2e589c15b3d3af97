"""The one module that talks JetStream management and translates nats-py's errors into ours.

Streams and consumers are declared idempotently at start-up (create, or update to match the
config), so a restarted or second daemon converges on the same state. Publishing goes through
nats-py's `publish_async` (pipelined acks, bounded by `publish_async_max_pending`), which this
module wraps only to add a deadline and to turn its failures into `PublishError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    PubAck,
    StorageType,
)
from nats.js.api import StreamConfig as NatsStreamConfig
from nats.js.kv import KeyValue

from busway._components import PublishAck
from busway._config import NatsConfig, StreamConfig, start_time
from busway._errors import PublishError, RetryableError, StartupError

__all__ = [
    "JetStreamPublisher",
    "KeyValueState",
    "await_pub_ack",
    "connect",
    "ensure_consumer",
    "ensure_stream",
    "publish_error",
    "state_bucket",
]

logger = logging.getLogger("busway.nats")


async def connect(
    config: NatsConfig,
    servers: list[str],
    *,
    on_reconnected: Callable[[], Awaitable[None]],
) -> NatsClient:
    """Connect to `servers`, reconnecting forever once connected; StartupError if unreachable."""

    async def error_cb(exc: Exception) -> None:
        logger.warning("NATS connection error: %s", exc or type(exc).__name__)

    async def disconnected_cb() -> None:
        if not client.is_closed:  # closing on purpose is not worth a warning
            logger.warning("disconnected from NATS; publishing waits and consumers pause")

    async def reconnected_cb() -> None:
        logger.info(
            "reconnected to NATS at %s",
            client.connected_url.netloc if client.connected_url else "?",
        )
        await on_reconnected()

    options: dict[str, Any] = {}
    if config.user is not None:
        options["user"] = config.user
        options["password"] = config.password
    if config.token is not None:
        options["token"] = config.token
    if config.credentials is not None:
        options["user_credentials"] = config.credentials
    try:
        client = await nats.connect(
            servers,
            name=config.name,
            connect_timeout=max(1, round(config.connect_timeout)),
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            pending_size=8 * 1024 * 1024,
            # Every subject busway publishes to is validated when the config is checked, and
            # ack subjects come from the server; nats-py's per-publish regex is pure cost.
            # Anything that derives a subject from message content must validate it itself.
            skip_subject_validation=True,
            **options,
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise StartupError(
            f"cannot connect to NATS at {', '.join(servers)}: {exc or type(exc).__name__}; "
            "check [nats] servers and that the server is running"
        ) from exc
    return client


@contextlib.contextmanager
def _startup_errors(what: str) -> Iterator[None]:
    try:
        yield
    except nats.js.errors.APIError as exc:
        raise StartupError(
            f"{what}: JetStream refused: {exc.description} (code {exc.err_code})"
        ) from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise StartupError(f"{what}: {exc or type(exc).__name__}") from exc


async def ensure_stream(js: JetStreamContext, stream: StreamConfig) -> None:
    """Create `stream`, or update it to match; with `create = false`, only check it exists."""
    what = f"stream {stream.name!r}"
    if not stream.create:
        with _startup_errors(f"{what} (create = false) must already exist"):
            await js.stream_info(stream.name)
        return
    config = NatsStreamConfig(
        name=stream.name,
        subjects=list(stream.subjects),
        storage=StorageType.FILE if stream.storage == "file" else StorageType.MEMORY,
        num_replicas=stream.replicas,
        duplicate_window=float(stream.duplicate_window),
        max_age=float(stream.max_age) if stream.max_age else None,
        max_bytes=stream.max_bytes,
        max_msgs=stream.max_msgs,
        discard=DiscardPolicy.OLD,
    )
    with _startup_errors(f"cannot declare {what}"):
        try:
            await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # stream name already in use with a different config
                raise
            await js.update_stream(config)


async def ensure_consumer(
    js: JetStreamContext,
    *,
    stream: str,
    durable: str,
    filter_subject: str,
    ack_wait: float,
    max_ack_pending: int,
    start: str | None = None,
) -> None:
    """Create the durable pull consumer `durable`, or update it to match.

    `max_deliver` stays unlimited: busway counts attempts itself and dead-letters, because
    JetStream would otherwise stop redelivering silently (it has no dead-letter queue).

    `start` (`"all"`, `"new"`, an RFC 3339 time; None = `"all"`) only applies when the consumer
    is created: JetStream cannot move an existing consumer, so an existing one keeps where it
    started, and a `start` that differs is reported as having no effect. A new consumer that
    starts on a non-empty stream without an explicit `start` says how much it will replay.
    """
    what = f"consumer {durable!r} on stream {stream!r}"
    policy, moment = _deliver_policy(start)
    with _startup_errors(f"cannot declare {what}"):
        try:
            existing: ConsumerConfig | None = (await js.consumer_info(stream, durable)).config
        except nats.js.errors.NotFoundError:
            existing = None
        if existing is not None:
            was = (existing.deliver_policy or DeliverPolicy.ALL, existing.opt_start_time)
            if start is not None and was != (policy, moment):
                logger.warning(
                    "%s: start = %r has no effect: the consumer exists (it started at %s) and "
                    "JetStream cannot move an existing consumer; to start over, stop busway "
                    "and delete it (nats consumer rm %s %s), or rename the component",
                    what,
                    start,
                    _start_label(*was),
                    stream,
                    durable,
                )
            policy, moment = was
        config = ConsumerConfig(
            name=durable,
            durable_name=durable,
            deliver_policy=policy,
            opt_start_time=moment,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=ack_wait,
            max_ack_pending=max_ack_pending,
            max_deliver=-1,
            filter_subject=filter_subject,
            max_waiting=512,
        )
        info = await js.add_consumer(stream, config)
    if existing is None:
        logger.info("%s created, starting at %s", what, _start_label(policy, moment))
        if start is None and info.num_pending:
            logger.warning(
                '%s is new and starts at the beginning of the stream (start = "all", the '
                "default): %d earlier message(s) on %s will be processed; set start = "
                '"new" (or a time) on the component to skip history',
                what,
                info.num_pending,
                filter_subject,
            )


def _deliver_policy(start: str | None) -> tuple[DeliverPolicy, datetime.datetime | None]:
    if start is None or start == "all":
        return DeliverPolicy.ALL, None
    if start == "new":
        return DeliverPolicy.NEW, None
    return DeliverPolicy.BY_START_TIME, start_time(start)


def _start_label(policy: str | None, moment: datetime.datetime | None) -> str:
    if policy == DeliverPolicy.BY_START_TIME and moment is not None:
        return moment.isoformat()
    return {"all": "the beginning of the stream", "new": "new messages"}.get(
        str(getattr(policy, "value", policy)), str(policy)
    )


def publish_error(exc: BaseException, subject: str) -> PublishError:
    """Our error for a failed JetStream publish to `subject`, saying what to do."""
    if isinstance(exc, nats.js.errors.NoStreamResponseError):
        return PublishError(f"no stream captures subject {subject!r} (or JetStream is down)")
    if isinstance(exc, nats.js.errors.APIError):
        return PublishError(
            f"JetStream refused {subject!r}: {exc.description} (code {exc.err_code})"
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return PublishError(f"no PubAck for {subject!r} in time: JetStream slow or unreachable")
    if isinstance(exc, asyncio.CancelledError):
        return PublishError(f"publish to {subject!r} abandoned (connection closed)")
    return PublishError(f"publish to {subject!r} failed: {exc!r}")


async def await_pub_ack(future: asyncio.Future[PubAck], subject: str, timeout: float) -> PubAck:
    """The PubAck of `future`, or PublishError; a future past `timeout` is cancelled.

    Cancelling matters: nats-py holds a `publish_async_max_pending` slot until the future is
    done, so an abandoned future would shrink the publish window forever.
    """
    if not future.done():
        await asyncio.wait((future,), timeout=timeout)
        if not future.done():
            future.cancel()
            raise publish_error(TimeoutError(), subject)
    try:
        return future.result()
    except (nats.errors.Error, asyncio.CancelledError) as exc:
        raise publish_error(exc, subject) from exc


def jetstream(client: NatsClient, *, window: int) -> JetStreamContext:
    """`client.jetstream()` with refused async publishes reported as refusals.

    nats-py's async-publish reply handler calls `APIError.from_error`, which *raises* the
    error instead of returning it, so the PubAck future of a refused message (stream full,
    message too large...) is never resolved: the error goes to the connection's error callback
    and the publisher waits out its whole `publish_timeout`. Here the raised error resolves the
    future, so a refusal comes back at once with JetStream's own description.
    """
    js = client.jetstream(publish_async_max_pending=window)
    handle = js._handle_async_reply
    prefix_length = len(client._inbox_prefix) + 24  # as nats-py slices the reply token

    async def handle_async_reply(message: Msg) -> None:
        try:
            await handle(message)
        except nats.js.errors.APIError as exc:
            future = js._publish_async_futures.get(message.subject[prefix_length:])
            if future is not None and not future.done():
                future.set_exception(exc)

    js._handle_async_reply = handle_async_reply  # type: ignore[method-assign,assignment]
    return js


def fail_unconfirmed(js: JetStreamContext) -> int:
    """Fail every publish still waiting for its PubAck; how many there were.

    Called after a reconnect: a PubAck the old connection did not deliver never comes, and
    nats-py would keep such futures (and their publish-window slots) until each one times out,
    one `publish_timeout` after another. Failing them at once lets routes nak their inputs and
    republish (the deterministic message ids make that harmless) and sources answer 503.
    """
    pending = [f for f in list(js._publish_async_futures.values()) if not f.done()]
    for future in pending:
        future.set_exception(nats.errors.ConnectionClosedError())
    if pending:
        logger.warning("reconnected: %d publish(es) lost their PubAck, retrying them", len(pending))
    return len(pending)


class JetStreamPublisher:
    """A `Publisher` for sources: publishes and waits for the PubAck, with a deadline."""

    def __init__(self, js: JetStreamContext, *, timeout: float) -> None:
        self._js = js
        self._timeout = timeout

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> PublishAck:
        """Store `data` on `subject`; PublishError unless JetStream confirmed it in time."""
        return await (await self.publish_pipelined(subject, data, headers=headers))

    async def publish_pipelined(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> Awaitable[PublishAck]:
        """Send now, confirm later: the returned awaitable yields the PubAck or raises."""
        # A `wait_stall` makes nats-py wrap every publish in `asyncio.wait_for`, a task per
        # message on Python 3.11 (measured: 2.6x slower file ingest). Only pass it when the
        # publish window is full and the call would actually wait.
        window_full = self._js._publish_async_pending_semaphore.locked()
        try:
            future = await self._js.publish_async(
                subject,
                data,
                headers=dict(headers) if headers else None,
                wait_stall=self._timeout if window_full else None,
            )
        except (nats.errors.Error, TimeoutError) as exc:
            raise publish_error(exc, subject) from exc
        return self._confirm(future, subject)

    async def _confirm(self, future: asyncio.Future[PubAck], subject: str) -> PublishAck:
        ack = await await_pub_ack(future, subject, self._timeout)
        return PublishAck(stream=ack.stream, sequence=ack.seq or 0, duplicate=bool(ack.duplicate))


class KeyValueState:
    """A `StateStore` on a JetStream key-value bucket, with keys prefixed per component."""

    def __init__(self, bucket: KeyValue, prefix: str) -> None:
        self._bucket = bucket
        self._prefix = prefix

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if absent or deleted."""
        try:
            entry = await self._bucket.get(self._prefix + key)
        except nats.js.errors.KeyNotFoundError:
            return None
        except nats.errors.Error as exc:
            raise RetryableError(f"cannot read state {key!r}: {exc!r}") from exc
        return entry.value

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; RetryableError if JetStream did not confirm."""
        try:
            await self._bucket.put(self._prefix + key, value)
        except nats.errors.Error as exc:
            raise RetryableError(f"cannot store state {key!r}: {exc!r}") from exc

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        try:
            await self._bucket.delete(self._prefix + key)
        except nats.errors.Error as exc:
            raise RetryableError(f"cannot delete state {key!r}: {exc!r}") from exc


async def state_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The key-value bucket busway keeps component state in, created if missing."""
    with _startup_errors(f"cannot open the state bucket {name!r}"):
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE)
            )
