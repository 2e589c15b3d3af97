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
from pathlib import Path
from typing import Any

import anyio
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
from busway._config.model import NatsConfig, StreamConfig, start_time
from busway._errors import PublishError, RetryableError, StartupError
from busway._nats.cluster import connect_options
from busway._observe.readiness import WriteRefusals

__all__ = [
    "JetStreamPublisher",
    "KeyValueDedupStore",
    "KeyValueState",
    "await_pub_ack",
    "connect",
    "dedup_store",
    "ensure_consumer",
    "ensure_stream",
    "nats_auth",
    "publish_error",
    "server_name_of",
    "state_bucket",
]

logger = logging.getLogger("busway.nats")

# JetStream's error codes for "no room": account resources (10002), insufficient resources
# (10023), memory or storage resources exceeded (10028, 10047), a stream limit with
# discard-new (10077: maximum messages / bytes / messages per subject exceeded).
_STORE_FULL_CODES = frozenset({10002, 10023, 10028, 10047, 10077})


async def connect(
    config: NatsConfig,
    servers: list[str],
    *,
    on_reconnected: Callable[[], Awaitable[None]],
    auth: Mapping[str, Any] | None = None,
    server_name: str | None = None,
    on_closed: Callable[[], Awaitable[None]] | None = None,
) -> NatsClient:
    """Connect to `servers` within `[nats] connect_timeout`, then reconnect forever.

    nats-py retries a first connection forever when reconnecting is allowed; here the attempt
    is bounded by `connect_timeout`, and refused credentials end it at once (retrying cannot
    fix them). The first connection's errors are reported once, in the StartupError, rather
    than logged per attempt. Cancelling (SIGTERM while connecting) abandons the attempt cleanly.
    `auth` comes from `nats_auth`. With `server_name`, the server must announce that name in
    its INFO (the embedded server busway started), else StartupError. `on_closed` is called if
    the connection closes for good after it started (`[nats] max_reconnect_attempts` ran out,
    or a `close()`).
    """
    client = NatsClient()
    started = False
    failures: list[BaseException] = []
    attempt = anyio.CancelScope(deadline=anyio.current_time() + float(config.connect_timeout))

    async def error_cb(exc: Exception) -> None:
        if not started:
            failures.append(exc)
            if _refused_credentials(exc):
                attempt.cancel()
            return
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

    async def closed_cb() -> None:
        if started and on_closed is not None:
            await on_closed()

    try:
        with attempt:
            await client.connect(
                servers,
                name=config.name,
                **connect_options(config),
                error_cb=error_cb,
                disconnected_cb=disconnected_cb,
                reconnected_cb=reconnected_cb,
                closed_cb=closed_cb,
                pending_size=8 * 1024 * 1024,
                # Every subject busway publishes to is validated when the config is checked, and
                # ack subjects come from the server; nats-py's per-publish regex is pure cost.
                # Anything that derives a subject from message content must validate it itself.
                skip_subject_validation=True,
                **(auth or {}),
            )
            started = True
    except (OSError, ValueError, nats.errors.Error, TimeoutError) as exc:
        failures.append(exc)
    finally:
        if not started:
            await _abandon(client)
    where = ", ".join(servers)
    if not started:
        last = failures[-1] if failures else None
        cause = (str(last) or type(last).__name__) if last is not None else "no answer"
        if last is not None and _refused_credentials(last):
            raise StartupError(
                f"NATS at {where} refused busway's credentials: {cause}; check [nats] user and "
                "password, token, credentials or nkey_seed"
            )
        raise StartupError(
            f"cannot connect to NATS at {where} within {float(config.connect_timeout):g}s "
            f"([nats] connect_timeout): {cause}; check [nats] servers and that the server runs"
        )
    if server_name is not None and server_name_of(client) != server_name:
        found = server_name_of(client)
        await _abandon(client)
        raise StartupError(
            f"the NATS server at {where} is not the embedded server busway started (it is named "
            f"{found!r}, not {server_name!r}); another server took [nats] listen: stop it or "
            "choose another port"
        )
    return client


def server_name_of(client: NatsClient) -> str | None:
    """The `server_name` the server `client` is connected to announced in its INFO."""
    name = client._server_info.get("server_name")
    return name if isinstance(name, str) else None


def nats_auth(config: NatsConfig, resolve: Callable[[str], Path]) -> dict[str, Any]:
    """nats-py's authentication options for `config`, with its key files checked first.

    nats-py reads `.creds` and seed files only while connecting, and loops forever on a
    `.creds` file without a JWT: a missing or malformed file is a StartupError here instead.
    Relative paths are resolved by `resolve` (against the config file's directory).
    """
    options: dict[str, Any] = {}
    if config.user is not None:
        options["user"] = config.user
        options["password"] = config.password
    if config.token is not None:
        options["token"] = config.token
    if config.credentials is not None:
        path = resolve(config.credentials)
        _check_key_file(path, "credentials", creds=True)
        options["user_credentials"] = str(path)
    if config.nkey_seed is not None:
        path = resolve(config.nkey_seed)
        _check_key_file(path, "nkey_seed", creds=False)
        options["nkeys_seed"] = str(path)
    return options


def _check_key_file(path: Path, key: str, *, creds: bool) -> None:
    """StartupError unless `path` holds a user JWT and seed (`creds`) or a bare NKey seed."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not text"
        raise StartupError(f"cannot read [nats] {key} file {path}: {reason}") from None
    lines = [line.strip() for line in text.splitlines()]
    if creds:
        jwt = _after(lines, "BEGIN NATS USER JWT")
        seed = _after(lines, "BEGIN USER NKEY SEED")
        if not jwt or not seed:
            raise StartupError(
                f"[nats] {key} file {path} is not a .creds file: it needs a "
                "'BEGIN NATS USER JWT' and a 'BEGIN USER NKEY SEED' block"
            )
    else:
        seed = next((line for line in lines if line and not line.startswith("#")), "")
    try:
        import nkeys
    except ImportError:  # pragma: no cover - a dependency of busway (nats-py[nkeys])
        raise StartupError(f"[nats] {key} needs the nkeys package: pip install nkeys") from None
    try:
        nkeys.from_seed(bytearray(seed.encode())).wipe()
    except Exception:
        raise StartupError(
            f"[nats] {key} file {path} holds no valid NKey user seed (a line starting 'SU')"
        ) from None


def _after(lines: list[str], marker: str) -> str:
    """The line after the one containing `marker`, or ''."""
    for index, line in enumerate(lines[:-1]):
        if marker in line:
            return lines[index + 1]
    return ""


def _refused_credentials(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, nats.errors.AuthorizationError) or any(
        word in text for word in ("authorization violation", "authentication", "user credentials")
    )


async def _abandon(client: NatsClient) -> None:
    """Close a client that will not be used, whatever state its connection attempt left.

    An attempt cancelled inside nats-py's own clean-up between two tries (refused credentials,
    the deadline, SIGTERM) leaves it marked closed with its socket open, so `close()` does
    nothing: the socket is closed here directly.
    """
    with anyio.CancelScope(shield=True), anyio.move_on_after(5):
        with contextlib.suppress(Exception):
            await client.close()
        transport = client._transport
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()  # type: ignore[no-untyped-call]
                await transport.wait_closed()  # type: ignore[no-untyped-call]


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
        refused = PublishError(
            f"JetStream refused {subject!r}: {exc.description} (code {exc.err_code})"
        )
        refused.store_full = exc.err_code in _STORE_FULL_CODES
        refused.subject = subject
        refused.description = f"{exc.description} (code {exc.err_code})"
        return refused
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
            error = publish_error(TimeoutError(), subject)
            error.unconfirmed = True  # sent: it may be stored, only its PubAck is missing
            raise error
    try:
        return future.result()
    except (nats.errors.Error, asyncio.CancelledError) as exc:
        error = publish_error(exc, subject)
        # JetStream's refusal and "no stream" are answers: nothing was stored. A connection
        # lost while waiting (or a cancelled wait) leaves the outcome unknown.
        refused = nats.js.errors.APIError | nats.js.errors.NoStreamResponseError
        error.unconfirmed = not isinstance(exc, refused)
        raise error from exc


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
    """A `Publisher` for sources: publishes and waits for the PubAck, with a deadline.

    Refusals for lack of room (and the successes that end them) go to `refusals`, which
    `/readyz` reads.
    """

    def __init__(
        self, js: JetStreamContext, *, timeout: float, refusals: WriteRefusals | None = None
    ) -> None:
        self._js = js
        self._timeout = timeout
        self._refusals = refusals if refusals is not None else WriteRefusals()

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
            raise self._noted(publish_error(exc, subject)) from exc
        return self._confirm(future, subject)

    async def _confirm(self, future: asyncio.Future[PubAck], subject: str) -> PublishAck:
        try:
            ack = await await_pub_ack(future, subject, self._timeout)
        except PublishError as exc:
            self._noted(exc)
            raise
        if self._refusals.active:
            self._refusals.stored(subject)
        return PublishAck(stream=ack.stream, sequence=ack.seq or 0, duplicate=bool(ack.duplicate))

    def _noted(self, error: PublishError) -> PublishError:
        if error.store_full and error.subject:
            self._refusals.refused(error.subject, error.description)
        return error


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


class KeyValueDedupStore:
    """A `DedupStore`: a key-value bucket whose TTL is a stream's duplicate window.

    Each operation is bounded by `timeout` (the publish timeout), like a publish: a request
    waits no longer on its record than on its message.
    """

    def __init__(self, bucket: KeyValue, ttl: float, *, timeout: float) -> None:
        self._bucket = bucket
        self.ttl = ttl
        self._timeout = timeout

    async def create(self, key: str, value: bytes) -> bytes | None:
        """Store `value` unless `key` is present: None if stored, else the present value."""
        for _ in range(3):  # present, then expired before we could read it: try again
            try:
                async with asyncio.timeout(self._timeout):
                    await self._bucket.create(key, value)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                pass
            except (nats.errors.Error, TimeoutError) as exc:
                raise RetryableError(f"cannot record {key!r}: {exc!r}") from exc
            else:
                return None
            present = await self.get(key)
            if present is not None:
                return present
        raise RetryableError(f"cannot record {key!r}: it keeps changing")

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, or None if absent, deleted or expired."""
        try:
            async with asyncio.timeout(self._timeout):
                return (await self._bucket.get(key)).value
        except nats.js.errors.KeyNotFoundError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise RetryableError(f"cannot read {key!r}: {exc!r}") from exc

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key`; RetryableError if JetStream did not confirm."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._bucket.put(key, value)
        except (nats.errors.Error, TimeoutError) as exc:
            raise RetryableError(f"cannot store {key!r}: {exc!r}") from exc

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._bucket.delete(key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise RetryableError(f"cannot delete {key!r}: {exc!r}") from exc


async def dedup_store(
    js: JetStreamContext, name: str, streams: list[str], *, timeout: float, replicas: int = 1
) -> KeyValueDedupStore:
    """The bucket `name`, its TTL the longest duplicate window of `streams` (as JetStream has
    them, so `create = false` streams count too), its replicas theirs or `replicas` (`[cluster]
    replicas`), whichever is more; created if missing,
    its TTL updated if a window changed."""
    with _startup_errors(f"cannot open the dedup bucket {name!r}"):
        configs = [(await js.stream_info(stream)).config for stream in streams]
        ttl = max((config.duplicate_window or 120.0 for config in configs), default=120.0)
        replicas = max([replicas, *(config.num_replicas or 1 for config in configs)])
        config = KeyValueConfig(
            bucket=name, history=1, ttl=ttl, replicas=replicas, storage=StorageType.FILE
        )
        try:
            bucket = await js.create_key_value(config)
        except nats.js.errors.BadRequestError as exc:
            if exc.err_code != 10058:  # exists with another configuration: a window changed
                raise
            existing = (await js.stream_info(f"KV_{name}")).config
            existing.max_age = ttl
            existing.duplicate_window = min(ttl, 120.0)
            existing.num_replicas = replicas
            await js.update_stream(existing)
            bucket = await js.key_value(name)
    return KeyValueDedupStore(bucket, ttl, timeout=timeout)
