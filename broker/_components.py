"""The two interfaces an adapter implements, and what the engine hands them.

A **source** takes messages from the outside world and publishes them into JetStream. It answers
its peer (an HTTP 202, moving a file to done/, committing a watermark) only after
`SourceContext.publish` returned, i.e. after JetStream confirmed the message is stored.

A **sink** delivers batches of messages to the outside world. The engine acks every message of a
batch after `Sink.write` returned; if it raises, the engine decides per message from the error:
`RetryableError` naks with back-off, `PermanentError` dead-letters, `BatchError` says which
messages of the batch failed and how. The ack never travels inside the message: the engine keeps
it beside the batch, so a sink cannot forget or double an ack.

    class PrintSink(Sink):
        async def write(self, batch: Sequence[Message]) -> None:
            for message in batch:
                print(message.subject, message.data)
"""

from __future__ import annotations

import abc
import contextvars
import logging
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from anyio.abc import TaskStatus

from busway._observe.redact import redact

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from busway._nats.requests import Requester
    from busway._observe.metrics import ComponentStats

__all__ = [
    "BuildContext",
    "DedupStore",
    "Lease",
    "Message",
    "PublishAck",
    "Publisher",
    "Reply",
    "Sink",
    "Source",
    "SourceContext",
    "StateEntry",
    "StateStore",
]


@dataclass(frozen=True, kw_only=True)
class BuildContext:
    """What an adapter's factory may need besides its own config: where relative paths start."""

    base_dir: Path

    def resolve_path(self, path: str) -> Path:
        """`path` (with `~` expanded) made absolute against the config file's directory."""
        joined = self.base_dir / Path(path).expanduser()
        try:
            return joined.resolve()
        except (RuntimeError, OSError):  # a symlink loop: the adapter's open reports ELOOP
            return Path(os.path.abspath(joined))


@dataclass(slots=True, frozen=True)
class Message:
    """One message delivered to a sink.

    `id` is stable across redeliveries: the `Nats-Msg-Id` the message was published with, or
    `<stream>:<sequence>` when it had none; a replayed dead letter keeps the id of the message
    that failed (`Busway-Replay-Msg-Id`). Sinks use it to make writes idempotent.
    """

    subject: str
    data: bytes
    headers: Mapping[str, str]
    id: str
    stream: str
    sequence: int
    attempt: int


@dataclass(slots=True, frozen=True)
class PublishAck:
    """JetStream's confirmation that a message is stored (`duplicate`: it already was)."""

    stream: str
    sequence: int
    duplicate: bool


class Publisher(Protocol):
    """Publishes into JetStream; a message counts as stored only once its PubAck arrived."""

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> PublishAck:
        """Store `data` on `subject`; raises PublishError if JetStream did not confirm it.

        Put a `Nats-Msg-Id` in `headers` to make retries of the same message harmless.
        """
        ...

    async def publish_pipelined(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> Awaitable[PublishAck]:
        """Send `data` without waiting; await the result for its PubAck (or PublishError).

        For sources that publish many messages (lines of a file, rows of a query): sending
        blocks only while the connection's publish window is full, so memory stays bounded.
        Answer the peer (move the file, commit the watermark) after awaiting every result.
        """
        ...


@dataclass(slots=True, frozen=True)
class StateEntry:
    """A stored value and its revision (what `StateStore.compare_and_set` compares)."""

    value: bytes
    revision: int


class StateStore(Protocol):
    """Small durable state a source keeps across restarts (watermarks, cursors).

    Backed by a JetStream key-value bucket, so it survives a crash and is shared by every
    daemon of a cluster. Keys are namespaced per source by the engine. Each method raises
    RetryableError when JetStream does not answer.
    """

    async def entry(self, key: str) -> StateEntry | None:
        """The value under `key` with its revision, or None."""
        ...

    async def compare_and_set(self, key: str, value: bytes, *, revision: int) -> bool:
        """Store `value` only if `key` is still at `revision` (0: absent); False if it moved.

        What two daemons writing one key need: read the entry, decide, write back with its
        revision, and read again on False.
        """
        ...

    async def get(self, key: str) -> bytes | None:
        """The value stored under `key`, or None."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key` durably (returns after JetStream confirmed it)."""
        ...

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        ...


class DedupStore(Protocol):
    """Records a source keeps about its message ids, for as long as JetStream remembers them.

    A JetStream key-value bucket whose entries expire `ttl` seconds after their last write,
    `ttl` being the `duplicate_window` of the stream that captures the source's subject; every
    daemon on the same NATS shares it. The HTTP source keeps an `Idempotency-Key`'s request
    fingerprint and stored answer here. Keys: letters, digits and `-_=./` only.
    Each method raises RetryableError when JetStream does not answer.
    """

    ttl: float

    async def create(self, key: str, value: bytes) -> bytes | None:
        """Store `value` unless `key` is present (atomic across daemons): None if stored,
        else the value already there."""
        ...

    async def get(self, key: str) -> bytes | None:
        """The value under `key`, or None."""
        ...

    async def put(self, key: str, value: bytes) -> None:
        """Store `value` under `key` (the entry's `ttl` starts again)."""
        ...

    async def delete(self, key: str) -> None:
        """Forget `key`."""
        ...


class Lease(Protocol):
    """The cluster-wide right to act alone, held through `SourceContext.lease`.

    `token` is the lease's fencing token: it grows with every new holder, so a value written
    with the token beside it lets a later writer see that a newer holder exists and refuse
    to overwrite its work. `lost` turns true when the lease was lost while held.
    """

    @property
    def token(self) -> int: ...

    @property
    def lost(self) -> bool: ...


@dataclass(slots=True, frozen=True)
class Reply:
    """The answer to `SourceContext.request`."""

    data: bytes
    headers: dict[str, str]


INGRESS_CLIENT: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "busway_ingress_client", default=None
)
"""The client address of the request the current task ingests (`SourceContext.note_client`),
which the audit trail records; None outside a request."""


@dataclass(kw_only=True)
class SourceContext:
    """What the engine gives a source: a publisher, durable state, the HTTP listener, metrics."""

    name: str
    publisher: Publisher
    state: StateStore
    stats: ComponentStats
    logger: logging.Logger
    dead_letter_subject: str
    http_routes: list[BaseRoute] | None = field(default=None)
    requester: Requester | None = field(default=None)
    open_dedup_store: Callable[[], Awaitable[DedupStore]] | None = field(default=None)
    open_lease: Callable[[str, float], AbstractAsyncContextManager[Lease]] | None = field(
        default=None
    )
    on_requested: Callable[[str, Mapping[str, str]], Awaitable[None]] | None = field(default=None)
    """Called with the subject and headers (with `Nats-Msg-Id`) of every stored request
    (`[audit]` records it as ingress); None when nothing listens."""

    def note_client(self, address: str | None) -> None:
        """Name the peer that sent what this task publishes next (an HTTP request's client
        address): the `[audit]` trail records it beside the principal. Scoped to the current
        task, so concurrent requests do not mix; cheap enough to call on every request."""
        INGRESS_CLIENT.set(address)

    def lease(self, name: str = "", *, ttl: float) -> AbstractAsyncContextManager[Lease]:
        """Hold this source's cluster-wide lease `name`: one daemon at a time runs the block.

            while True:
                async with context.lease(ttl=10.0) as lease:
                    await poll_forever(fence=lease.token)
                # lost (another daemon took over): wait to win it again

        Entering waits until this daemon holds the lease (a standby daemon waits here). The
        block is cancelled when the lease is lost (not renewed in time, or taken over), and
        then ends normally with `lease.lost` true. Leaving it releases the lease. A holder
        that dies is replaced within `1.5 * ttl`.
        """
        if self.open_lease is None:
            raise RuntimeError("a lease needs a running Bus")
        return self.open_lease(name, ttl)

    async def dedup_store(self) -> DedupStore:
        """This source's `DedupStore`; open it at start-up (StartupError if it cannot be)."""
        if self.open_dedup_store is None:
            raise RuntimeError("a dedup store needs a running Bus")
        return await self.open_dedup_store()

    async def request(
        self,
        subject: str,
        data: bytes,
        *,
        message_id: str,
        timeout: float,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        """Publish a request durably and wait for the answer of a route's `reply` stage.

        The request is stored first (PublishError if it cannot be), so it is not lost when
        no answer comes in time (TimeoutError): it is processed, just not answered in time.
        """
        if self.requester is None:
            raise RuntimeError("request-reply needs a running Bus")
        try:
            answer = await self.requester.request(
                subject, data, dict(headers or {}), timeout, message_id=message_id
            )
        except TimeoutError:
            await self._requested(subject, headers, message_id)  # stored, not answered
            raise
        await self._requested(subject, headers, message_id)
        return Reply(data=answer.data, headers=dict(answer.headers or {}))

    async def _requested(
        self, subject: str, headers: Mapping[str, str] | None, message_id: str
    ) -> None:
        if self.on_requested is not None:
            await self.on_requested(subject, {**(headers or {}), "Nats-Msg-Id": message_id})

    async def dead_letter(
        self,
        data: bytes,
        *,
        reason: str,
        error: str,
        origin: str,
        headers: Mapping[str, str] | None = None,
        message_id: str,
    ) -> PublishAck:
        """Store input that cannot become a message (a bad line, an unreadable row).

        `origin` says where it came from (`file.csv:17`), `message_id` makes a retry of the
        same input harmless. Headers carry `Busway-Error`, `Busway-Error-Reason`,
        `Busway-Component` and `Busway-Origin`. Counted in the source's metrics.
        """
        dead_headers = dict(headers or {})
        dead_headers.update(
            {
                "Nats-Msg-Id": f"deadletter:{self.name}:{message_id}",
                "Busway-Component": self.name,
                "Busway-Component-Kind": "source",
                "Busway-Error-Reason": reason,
                "Busway-Error": " ".join(redact(error).split())[:1024],
                "Busway-Origin": origin,
            }
        )
        ack = await self.publisher.publish(self.dead_letter_subject, data, headers=dead_headers)
        self.stats.dead_lettered += 1
        self.stats.count_error(reason)
        self.stats.note_error(f"{reason}: {error} ({origin})")
        return ack

    def add_http_route(self, route: BaseRoute) -> None:
        """Serve `route` on the shared HTTP listener; only during `Source.run` start-up."""
        if self.http_routes is None:
            from busway._errors import ConfigError

            raise ConfigError(
                f"source {self.name!r} serves HTTP but [http] listen is not set: "
                'add `[http] listen = "127.0.0.1:8080"`'
            )
        self.http_routes.append(route)


class Source(abc.ABC):
    """An inbound adapter: brings messages into JetStream."""

    @abc.abstractmethod
    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Run until cancelled; call `task_status.started()` once ready to take messages.

        Everything that can fail at start-up (binding, connecting, opening) happens before
        `started()`, so the daemon refuses to start rather than run half-broken.
        """


class Sink(abc.ABC):
    """An outbound adapter: delivers batches of messages out of the bus."""

    async def open(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Acquire resources (files, pools); raise StartupError if the sink cannot work."""

    @abc.abstractmethod
    async def write(self, batch: Sequence[Message]) -> None:
        """Deliver every message of `batch` durably, or raise (see the module docstring)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release resources; called once, after the last `write` returned."""

    def ready(self) -> bool:
        """False while the sink knows it cannot deliver (e.g. disk full); shown in /readyz."""
        return True
