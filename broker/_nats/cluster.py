"""Running on a NATS cluster: fast failover, start-up against a cluster that is not ready yet,
replica checks, busway's own replicated state bucket, and consumers shared by daemons.

Three things differ from a single server, and each has its function here:

* **A hung server must be noticed in seconds.** nats-py pings every 120 s and gives up after 2
  unanswered pings: a frozen node held a daemon for minutes while the cluster had failed over
  in seconds. `connect_options` passes `[nats] ping_interval` and friends instead.
* **JetStream may not be ready when busway starts.** A cluster still forming has no meta leader
  (error 10008, or no responders), a restarted node cannot place an R3 asset until its peers
  are back (10005). `until_ready` retries such answers with back-off up to `[cluster]
  startup_timeout`, one log line per attempt, then fails with the usual StartupError.
* **Replicas must exist.** A standalone server cannot hold an R3 stream (10074): that is a
  configuration mistake, reported at once by `check_replicas_possible`, never retried.

`PubAckWatch` makes a stalled connection visible on `/readyz` ("no PubAck for 2s") before the
pings declare it dead. Daemons on one config share each durable consumer: a reload says which
ones it changes for all of them (`shared_consumer_notes`), and `busway status --orphans` lists
the ones no component uses any more (`durable_consumers`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from busway._config.model import Config, NatsConfig
from busway._errors import StartupError
from busway._nats import internals

__all__ = [
    "ConsumerSummary",
    "PubAckWatch",
    "check_replicas_possible",
    "connect_options",
    "durable_consumers",
    "is_clustered",
    "not_ready_reason",
    "open_state_bucket",
    "shared_consumer_notes",
    "until_ready",
]

logger = logging.getLogger("busway.nats")

_T = TypeVar("_T")

# JetStream answers that mean "not now", not "never": the meta group has no leader yet or the
# system is catching up (10008), this server cannot serve the request at the moment (10009),
# not enough servers are up to place the replicas (10005).
_NOT_READY_CODES = frozenset({10005, 10008, 10009})
_NO_PEERS = 10005
_REPLICAS_NEED_A_CLUSTER = 10074  # "replicas > 1 not supported in non-clustered mode"

_FIRST_BACKOFF = 0.25
_LONGEST_BACKOFF = 5.0


def connect_options(config: NatsConfig) -> dict[str, Any]:
    """nats-py `connect` options for failover: pings, reconnect pause and attempts, and how
    long one attempt on one server may take.

    nats-py spends its `connect_timeout` on *each* attempt, reconnections included, and a
    frozen server accepts TCP connections (the kernel does) but never sends its INFO: with
    `[nats] connect_timeout` there, every pass over the pool waited that long on the frozen
    node. One attempt gets what the pings allow a silent server, `ping_interval *
    max_outstanding_pings` (at least 1 s, at most `connect_timeout`); the first connection
    as a whole stays bounded by `connect_timeout`, retrying within it.
    """
    silent = float(config.ping_interval) * config.max_outstanding_pings
    return {
        "connect_timeout": min(float(config.connect_timeout), max(1.0, silent)),
        "ping_interval": float(config.ping_interval),
        "max_outstanding_pings": config.max_outstanding_pings,
        "reconnect_time_wait": float(config.reconnect_wait),
        "max_reconnect_attempts": config.max_reconnect_attempts,
    }


def is_clustered(client: NatsClient) -> bool:
    """True if the server `client` is connected to announced a cluster in its INFO."""
    return bool(internals.server_info(client).get("cluster"))


def _visible_servers(client: NatsClient) -> int:
    """How many servers of the cluster the connected server announces right now (>= 1)."""
    urls = internals.server_info(client).get("connect_urls") or []
    return max(1, len(set(urls)))


def check_replicas_possible(client: NatsClient, config: Config) -> None:
    """StartupError at once if `config` asks for copies a standalone server cannot hold.

    In a cluster the count is checked by JetStream when it places each asset: a server that is
    down or still joining makes that fail for a while (retried), more replicas than servers
    makes it fail for good (reported by `until_ready` when the time is up).
    """
    if is_clustered(client):
        return
    wanted = [("[cluster] replicas", config.cluster.replicas)]
    wanted += [
        (f"stream {stream.name!r} replicas", stream.replicas or 1)
        for stream in config.streams
        if stream.create
    ]
    for key, replicas in wanted:
        if replicas > 1:
            raise StartupError(
                f"{key} = {replicas}, but the NATS server at {_server_of(client)} is not part "
                "of a cluster: it can hold one copy only; set replicas = 1 or point [nats] "
                "servers at a cluster"
            )


def _server_of(client: NatsClient) -> str:
    url = client.connected_url
    return url.netloc if url is not None else "?"


def not_ready_reason(exc: BaseException) -> str | None:
    """Why JetStream cannot serve now, if `exc` (or its cause) says it is "not yet"; else None.

    StartupErrors from `busway._nats.jetstream` carry the nats-py error as their cause.
    """
    cause = exc.__cause__ if isinstance(exc, StartupError) and exc.__cause__ else exc
    if isinstance(cause, nats.js.errors.APIError):
        if cause.err_code in _NOT_READY_CODES:
            return f"{cause.description} (code {cause.err_code})"
        if cause.code == 503:  # no responders: JetStream not (yet) serving this account
            return "JetStream not available yet (no responders)"
        return None
    if isinstance(cause, nats.errors.NoRespondersError):
        return "JetStream not available yet (no responders)"
    if isinstance(cause, nats.errors.TimeoutError | TimeoutError):
        return "JetStream did not answer in time"
    return None


async def until_ready(
    what: str,
    attempt: Callable[[], Awaitable[_T]],
    *,
    timeout: float,
    client: NatsClient | None = None,
    replicas: int = 1,
) -> _T:
    """`await attempt()`, retried with back-off while JetStream is not ready, up to `timeout`.

    Each retry logs one line saying what waits and why. When the time is up, the last
    StartupError is raised, saying how long busway waited; for a placement failure also how
    many servers the cluster shows, against the `replicas` asked for. Any other error is raised
    at once: retrying cannot fix a wrong configuration.
    """
    deadline = time.monotonic() + timeout
    delay = _FIRST_BACKOFF
    tries = 0
    while True:
        tries += 1
        try:
            return await attempt()
        except StartupError as exc:
            _explain_needs_cluster(exc, replicas)
            reason = not_ready_reason(exc)
            left = deadline - time.monotonic()
            if reason is None or timeout <= 0:  # not a "not yet", or retrying is off
                raise
            if left <= 0:
                raise StartupError(
                    f"{exc} (still after {tries} attempt(s) in {timeout:g}s, [cluster] "
                    f"startup_timeout){_placement_hint(exc, client, replicas)}"
                ) from exc.__cause__
            pause = min(delay, left)
            logger.warning(
                "%s: JetStream not ready (%s); attempt %d, retrying in %.1fs (up to %gs, "
                "[cluster] startup_timeout)",
                what,
                reason,
                tries,
                pause,
                timeout,
            )
            await anyio.sleep(pause)
            delay = min(delay * 2, _LONGEST_BACKOFF)


def _explain_needs_cluster(exc: StartupError, replicas: int) -> None:
    cause = exc.__cause__
    if isinstance(cause, nats.js.errors.APIError) and cause.err_code == _REPLICAS_NEED_A_CLUSTER:
        raise StartupError(
            f"{exc}: the NATS server is not part of a cluster; set [cluster] replicas (and "
            f"streams' replicas) to 1, or point [nats] servers at a cluster of {replicas}+"
        ) from cause


def _placement_hint(exc: StartupError, client: NatsClient | None, replicas: int) -> str:
    cause = exc.__cause__
    if not isinstance(cause, nats.js.errors.APIError) or cause.err_code != _NO_PEERS:
        return ""
    seen = f"{_visible_servers(client)} server(s) visible now" if client else "too few servers"
    return (
        f": {replicas} replicas need {replicas} servers up, the cluster has {seen}; start the "
        "missing servers or lower [cluster] replicas / the stream's replicas"
    )


async def open_state_bucket(js: JetStreamContext, name: str, *, replicas: int) -> KeyValue:
    """busway's state bucket `name` with `replicas` copies: created, or scaled to match.

    Opening it here at start-up (before any component) fixes its replica count; components
    that open it later by name find it as made here. StartupError if JetStream refuses.
    """
    what = f"cannot open the state bucket {name!r}"
    try:
        try:
            info = await js.stream_info(f"KV_{name}")
        except nats.js.errors.NotFoundError:
            return await js.create_key_value(
                KeyValueConfig(bucket=name, history=1, storage=StorageType.FILE, replicas=replicas)
            )
        if (info.config.num_replicas or 1) != replicas:
            logger.info(
                "state bucket %r: %d -> %d replica(s) ([cluster] replicas)",
                name,
                info.config.num_replicas or 1,
                replicas,
            )
            info.config.num_replicas = replicas
            await js.update_stream(info.config)
        return await js.key_value(name)
    except nats.js.errors.APIError as exc:
        raise StartupError(
            f"{what}: JetStream refused: {exc.description} (code {exc.err_code})"
        ) from exc
    except (nats.errors.Error, TimeoutError) as exc:
        raise StartupError(f"{what}: {exc or type(exc).__name__}") from exc


class PubAckWatch:
    """Notices PubAcks that stop coming while publishes wait: a stalled connection.

    Installed on a JetStream context, it stamps the time of every PubAck (one clock read per
    acknowledgement) and counts publishes still waiting; `reason` turns both into a readiness
    reason once nothing was acknowledged for `after` seconds while something waits. Pings
    notice a dead server only after `ping_interval * (max_outstanding_pings + 1)`; this shows
    the stall on `/readyz` as it happens.
    """

    def __init__(self, js: JetStreamContext, *, after: float) -> None:
        self.after = after
        self._js = js
        self._last_answer = time.monotonic()
        self._waiting_since: float | None = None
        internals.on_pub_ack(js, self._answered)

    def _answered(self) -> None:
        self._last_answer = time.monotonic()

    def reason(self) -> str | None:
        """ "no PubAck for Ns" while publishes wait and none was answered lately, else None."""
        waiting = internals.waiting_pub_acks(self._js)
        now = time.monotonic()
        if not waiting:
            self._waiting_since = None
            return None
        if self._waiting_since is None:
            self._waiting_since = now
        silent = now - max(self._last_answer, self._waiting_since)
        if silent < self.after:
            return None
        return (
            f"no PubAck for {silent:.0f}s ({waiting} publish(es) waiting): JetStream is slow or "
            "its server unreachable; busway fails over when the pings time out"
        )


# -- consumers shared by every daemon on one config ---------------------------------------------

_CONSUMER_SETTINGS = (
    ("from_", "from"),
    ("stream", "stream"),
    ("max_in_flight", "max_in_flight"),
    ("ack_wait", "ack_wait"),
    ("start", "start"),
)


def shared_consumer_notes(old: Config, new: Config) -> list[str]:
    """What a reload from `old` to `new` changes in durable consumers, one sentence each.

    A durable consumer is named after its component (`busway-route-<name>`), so every daemon
    running the same config pulls from the same one: reloading one daemon changes it under all
    of them, and the others keep running their old settings against it until they reload too.
    """
    notes = []
    for kind, before, after in (("route", old.routes, new.routes), ("sink", old.sinks, new.sinks)):
        now = {component.name: component for component in after}
        for component in before:
            other = now.get(component.name)
            if other is None:
                continue
            changed = [
                key
                for field, key in _CONSUMER_SETTINGS
                if getattr(component, field) != getattr(other, field)
            ]
            if changed:
                notes.append(
                    f"consumer busway-{kind}-{component.name} ({', '.join(changed)} changed) is "
                    "shared by every daemon on this config: the change applies to all of them; "
                    "reload the others too"
                )
    return notes


class ConsumerSummary:
    """One durable consumer of a stream, as `busway status --orphans` lists it."""

    __slots__ = ("ack_pending", "name", "pending", "stream")

    def __init__(self, stream: str, name: str, pending: int, ack_pending: int) -> None:
        self.stream = stream
        self.name = name
        self.pending = pending
        self.ack_pending = ack_pending


async def durable_consumers(client: NatsClient, streams: list[str]) -> list[ConsumerSummary]:
    """Every durable consumer of `streams` (missing streams are skipped); StartupError if
    JetStream cannot list them."""
    js = client.jetstream()
    found: list[ConsumerSummary] = []
    for stream in streams:
        try:
            infos = await js.consumers_info(stream)
        except nats.js.errors.NotFoundError:
            continue
        except (nats.errors.Error, TimeoutError) as exc:
            raise StartupError(f"cannot list the consumers of stream {stream!r}: {exc}") from exc
        found.extend(
            ConsumerSummary(stream, info.name, info.num_pending or 0, info.num_ack_pending or 0)
            for info in infos
            if info.config.durable_name
        )
    return found
