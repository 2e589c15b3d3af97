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
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    KeyValueConfig,
    PubAck,
    StorageType,
    SubjectTransform,
)
from nats.js.api import StreamConfig as NatsStreamConfig
from nats.js.kv import KeyValue

from busway._components import PublishAck
from busway._config.model import NatsConfig, StreamConfig, start_time
from busway._errors import BusUnavailable, PublishError, StartupError
from busway._nats import internals
from busway._nats.cluster import connect_options
from busway._nats.errors import is_refusal, map_exceptions, publish_error, startup_errors
from busway._nats.kv import Bucket, KeyValueDedupStore, KeyValueState
from busway._nats.partition_subjects import subject_transform
from busway._nats.tls import handshake_failure, is_handshake_failure, tls_options
from busway._observe.readiness import WriteRefusals

__all__ = [
    "ConsumerState",
    "JetStreamPublisher",
    "KeyValueDedupStore",
    "KeyValueState",
    "await_pub_ack",
    "close_connection",
    "connect",
    "connect_once",
    "consumer_state",
    "dedup_store",
    "ensure_consumer",
    "ensure_stream",
    "flush",
    "nats_auth",
    "open_state",
    "publish_confirmed",
    "publish_core",
    "publish_error",
    "server_name_of",
    "state_bucket",
]

logger = logging.getLogger("busway.nats")


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
    `auth` comes from `nats_auth`: with TLS options in it, a server that does not offer TLS
    is refused before busway's credentials are sent, and a failed handshake (a CA busway does
    not trust, a name mismatch, a refused client certificate) ends the attempt at once with a
    StartupError saying which. With `server_name`, the server must announce that name in
    its INFO (the embedded server busway started), else StartupError. `on_closed` is called if
    the connection closes for good after it started (`[nats] max_reconnect_attempts` ran out,
    or a `close()`).
    """
    client = _client(auth)
    started = False
    failures: list[BaseException] = []
    attempt = anyio.CancelScope(deadline=anyio.current_time() + float(config.connect_timeout))

    async def error_cb(exc: Exception) -> None:
        if not started:
            failures.append(exc)
            if _refused_credentials(exc) or _refused_tls(exc, auth):
                attempt.cancel()
            return
        if "permissions violation" in str(exc).lower():
            logger.error(
                "NATS denied busway: %s; grant busway's NATS user that subject (or correct the "
                "config that uses it)",
                exc,
            )
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
        if last is not None and _refused_tls(last, auth):
            raise StartupError(f"TLS with NATS at {where} failed: {_tls_cause(last, config)}")
        raise StartupError(
            f"cannot connect to NATS at {where} within {float(config.connect_timeout):g}s "
            f"([nats] connect_timeout): {cause}; check [nats] servers and that the server runs"
        )
    if (
        server_name is not None
        and internals.available("Client._server_info")
        and server_name_of(client) != server_name
    ):
        found = server_name_of(client)
        await _abandon(client)
        raise StartupError(
            f"the NATS server at {where} is not the embedded server busway started (it is named "
            f"{found!r}, not {server_name!r}); another server took [nats] listen: stop it or "
            "choose another port"
        )
    return client


async def close_connection(client: NatsClient) -> None:
    """Flush what is pending (acks included) and close, within 5 s, whatever state it is in."""
    with anyio.move_on_after(5, shield=True):
        if not client.is_closed:
            with contextlib.suppress(Exception):
                await client.flush(timeout=2)
            # nats-py raises RuntimeError writing its pending buffer to a transport the
            # server already closed (an embedded server that died for good): nothing left
            # to save then, and the reason the bus stops must not be masked.
            with contextlib.suppress(Exception):
                await client.close()


async def connect_once(
    servers: list[str], *, name: str, connect_timeout: float, auth: Mapping[str, Any]
) -> NatsClient:
    """A short-lived connection for a command (no reconnecting): BusUnavailable, with the
    server's own words, if none of `servers` takes it within `connect_timeout`."""
    errors: list[Exception] = []

    async def remember(exc: Exception) -> None:
        """Connection errors are reported once, in the BusUnavailable, not logged per try."""
        errors.append(exc)

    client = _client(auth)
    # nats-py annotates the wait as int but sleeps for any number of seconds.
    options: dict[str, Any] = {"reconnect_time_wait": 0.2, **auth}
    try:
        await client.connect(
            servers,
            name=name,
            connect_timeout=max(1, round(connect_timeout)),
            # nats-py retries the first connect forever unless attempts are bounded (> 0).
            allow_reconnect=False,
            max_reconnect_attempts=1,
            error_cb=remember,
            **options,
        )
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        cause = errors[-1] if errors else exc
        raise BusUnavailable(str(cause) or type(cause).__name__) from exc
    return client


def _client(auth: Mapping[str, Any] | None) -> NatsClient:
    """A nats-py client that, when `auth` asks for TLS, refuses a server that does not."""
    client = NatsClient()
    if auth and "tls" in auth and not auth.get("tls_handshake_first"):
        internals.require_tls(client)
    return client


def _refused_tls(exc: BaseException, auth: Mapping[str, Any] | None) -> bool:
    """A TLS failure retrying cannot cure: a handshake refused, or TLS not offered. (A
    server that requires TLS gets it even when `[nats]` has no TLS keys: nats-py upgrades.)"""
    return isinstance(exc, internals.TlsNotOffered | ssl.SSLError) or (
        bool(auth) and "tls" in (auth or {}) and is_handshake_failure(exc)
    )


def _tls_cause(exc: BaseException, config: NatsConfig) -> str:
    if isinstance(exc, internals.TlsNotOffered):
        return str(exc)
    return handshake_failure(exc, config)


def server_name_of(client: NatsClient) -> str | None:
    """The `server_name` the server `client` is connected to announced in its INFO."""
    return internals.server_name(client)


def nats_auth(config: NatsConfig, resolve: Callable[[str], Path]) -> dict[str, Any]:
    """nats-py's authentication and TLS options for `config`, with its key files checked first.

    nats-py reads `.creds` and seed files only while connecting, and loops forever on a
    `.creds` file without a JWT: a missing or malformed file is a StartupError here instead.
    The TLS context is built here, once (`busway._nats.tls`): an unreadable or malformed
    certificate file is a ConfigError naming its key.
    Relative paths are resolved by `resolve` (against the config file's directory).
    """
    options: dict[str, Any] = tls_options(config, resolve)
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
        with contextlib.suppress(Exception):
            await internals.close_transport(client)


async def ensure_stream(js: JetStreamContext, stream: StreamConfig) -> None:
    """Create `stream`, or update it to match; with `create = false`, only check it exists."""
    what = f"stream {stream.name!r}"
    if not stream.create:
        with startup_errors(f"{what} (create = false) must already exist"):
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
    transform = subject_transform(stream)
    if transform is not None:
        config.subject_transform = SubjectTransform(src=transform[0], dest=transform[1])
    with startup_errors(f"cannot declare {what}"):
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
    with startup_errors(f"cannot declare {what}"):
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


@dataclass(frozen=True, slots=True)
class ConsumerState:
    """A durable consumer's position, as JetStream reports it (`consumer_info`)."""

    delivered: int
    """Highest stream sequence delivered."""
    ack_pending: int
    """Messages delivered and not acked yet."""
    ack_floor: int
    """Every message up to this stream sequence is acked."""
    pending: int
    """Messages not delivered yet (the backlog)."""
    redelivered: int
    """Messages delivered more than once and not acked yet."""


async def consumer_state(js: JetStreamContext, stream: str, durable: str) -> ConsumerState:
    """Where consumer `durable` on `stream` stands; BusUnavailable / JetStreamError if unknown."""
    with map_exceptions(f"cannot read consumer {durable!r} on stream {stream!r}"):
        info = await js.consumer_info(stream, durable)
    return ConsumerState(
        delivered=info.delivered.stream_seq or 0 if info.delivered else 0,
        ack_pending=info.num_ack_pending or 0,
        ack_floor=info.ack_floor.stream_seq or 0 if info.ack_floor else 0,
        pending=info.num_pending or 0,
        redelivered=info.num_redelivered or 0,
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
        error.unconfirmed = not is_refusal(exc)
        raise error from exc


async def publish_core(
    client: NatsClient, subject: str, data: bytes, *, headers: dict[str, str] | None = None
) -> None:
    """Send on core NATS (no stream, no PubAck: a reply to an inbox); BusUnavailable if the
    connection cannot take it."""
    with map_exceptions(f"cannot send to {subject!r}"):
        await client.publish(subject, data, headers=headers)


async def flush(client: NatsClient, timeout: float) -> None:
    """Return once the server has everything sent so far (acks included); BusUnavailable if
    it does not say so within `timeout`."""
    with map_exceptions("cannot flush the NATS connection"):
        await client.flush(timeout=max(1, int(timeout)))


async def publish_confirmed(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    *,
    headers: dict[str, str] | None,
    timeout: float,
) -> PubAck:
    """Publish and wait for the PubAck (at most `timeout`); PublishError if not confirmed."""
    try:
        future = await js.publish_async(subject, data, headers=headers)
    except Exception as exc:
        raise publish_error(exc, subject) from exc
    return await await_pub_ack(future, subject, timeout)


def jetstream(client: NatsClient, *, window: int) -> JetStreamContext:
    """`client.jetstream()` with refused async publishes reported as refusals at once.

    Checks, once per connection, the nats-py internals busway uses (`busway._nats.internals`).
    """
    js = client.jetstream(publish_async_max_pending=window)
    internals.check(client, js)
    internals.resolve_refusals_at_once(client, js)
    return js


def fail_unconfirmed(js: JetStreamContext) -> int:
    """Fail every publish still waiting for its PubAck; how many there were.

    Called after a reconnect: a PubAck the old connection did not deliver never comes, and
    nats-py would keep such futures (and their publish-window slots) until each one times out,
    one `publish_timeout` after another. Failing them at once lets routes nak their inputs and
    republish (the deterministic message ids make that harmless) and sources answer 503.
    """
    count = internals.fail_pending_publishes(js, nats.errors.ConnectionClosedError())
    if count:
        logger.warning("reconnected: %d publish(es) lost their PubAck, retrying them", count)
    return count


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
        window_full = internals.publish_window_full(self._js)
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


async def state_bucket(js: JetStreamContext, name: str) -> KeyValue:
    """The key-value bucket busway keeps component state in, created if missing."""
    with startup_errors(f"cannot open the state bucket {name!r}"):
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE)
            )


async def open_state(js: JetStreamContext, name: str) -> Bucket:
    """The state bucket `name` (see `state_bucket`) with busway's errors, as a `Bucket`."""
    return Bucket(await state_bucket(js, name), name)


async def dedup_store(
    js: JetStreamContext, name: str, streams: list[str], *, timeout: float, replicas: int = 1
) -> KeyValueDedupStore:
    """The bucket `name`, its TTL the longest duplicate window of `streams` (as JetStream has
    them, so `create = false` streams count too), its replicas theirs or `replicas` (`[cluster]
    replicas`), whichever is more; created if missing,
    its TTL updated if a window changed."""
    with startup_errors(f"cannot open the dedup bucket {name!r}"):
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
