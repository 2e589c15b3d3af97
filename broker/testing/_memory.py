"""The `memory` source and sink: test doubles that live in the test's own process.

    [[sinks]]
    name = "out"
    type = "memory"
    from = "orders.>"

    [[sources]]
    name = "in"
    type = "memory"
    subject = "orders.new"

A `MemorySink` records every batch it is given and every message it delivered (duplicates
included, so a test can assert "exactly once"), and fails the message ids it is told to, as
the engine's contract allows: transiently (the engine naks and redelivers) or permanently (the
engine dead-letters). A `MemorySource` publishes what the test pushes, through the same
`SourceContext` every source gets, with the message id `<source name>:<id>`.

They are registered per harness by `memory_adapter(hub)`: the built-in registry is never
changed, and two harnesses in one process keep their instances apart.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import orjson
from anyio.abc import TaskStatus

from busway._components import BuildContext, Message, PublishAck, Sink, Source, SourceContext
from busway._config.model import SinkConfig, SourceConfig
from busway._errors import BatchError, DeliveryError, PermanentError, RetryableError
from busway._registry import Adapter

__all__ = [
    "MemoryHub",
    "MemorySink",
    "MemorySinkConfig",
    "MemorySource",
    "MemorySourceConfig",
    "Notifier",
    "encode_body",
    "memory_adapter",
]


class MemorySinkConfig(SinkConfig, tag="memory", frozen=True, kw_only=True):
    """A sink that keeps what it delivers in memory, for tests (`busway.testing`)."""


class MemorySourceConfig(SourceConfig, tag="memory", frozen=True, kw_only=True):
    """A source the test feeds from code: `harness.source(name).push(body)` (`busway.testing`)."""


def encode_body(body: bytes | str | Any) -> bytes:
    """`body` as bytes: bytes as they are, text as UTF-8, anything else as JSON."""
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return orjson.dumps(body)


class Notifier:
    """Wakes waiters whenever a recorded list grew; `wait_for` gives up after a timeout."""

    def __init__(self) -> None:
        self._changed: anyio.Event | None = None  # made on first wait: needs a running loop

    def notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def wait_for(self, count: int, have: Sequence[Any], timeout: float, what: str) -> None:
        with anyio.move_on_after(timeout):
            while len(have) < count:
                if self._changed is None:
                    self._changed = anyio.Event()
                await self._changed.wait()
        if len(have) < count:
            raise TimeoutError(f"{what}: {len(have)} of {count} within {timeout:g}s")


class MemorySink(Sink):
    """Records batches and delivered messages; fails the ids it is told to fail."""

    def __init__(self, config: MemorySinkConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.batches: list[list[Message]] = []
        """Every batch `write` was called with, in order, failures included."""
        self.messages: list[Message] = []
        """Every message delivered (not failed), in order, a redelivered one as often as it
        was delivered."""
        self.opened = False
        self.closed = False
        self._transient: dict[str, int] = {}
        self._retry_after: dict[str, float | None] = {}
        self._permanent: set[str] = set()
        self._notifier = Notifier()

    @property
    def ids(self) -> list[str]:
        """The ids of `messages`, in delivery order."""
        return [message.id for message in self.messages]

    def bodies(self) -> list[Any]:
        """The JSON-decoded bodies of `messages`, in delivery order."""
        return [orjson.loads(message.data) for message in self.messages]

    def fail_transiently(self, *ids: str, times: int = 1, retry_after: float | None = None) -> None:
        """Fail each of `ids` with a RetryableError the next `times` times it comes."""
        for message_id in ids:
            self._transient[message_id] = times
            self._retry_after[message_id] = retry_after

    def fail_permanently(self, *ids: str) -> None:
        """Fail each of `ids` with a PermanentError, every time: the engine dead-letters it."""
        self._permanent.update(ids)

    async def open(self) -> None:
        """Mark the sink open."""
        self.opened = True

    async def write(self, batch: Sequence[Message]) -> None:
        """Deliver `batch` in memory; the ids told to fail fail on their own (BatchError)."""
        self.batches.append(list(batch))
        failures: dict[int, DeliveryError] = {}
        for index, message in enumerate(batch):
            if message.id in self._permanent:
                failures[index] = PermanentError(f"message {message.id} is refused (test)")
            elif self._transient.get(message.id, 0) > 0:
                self._transient[message.id] -= 1
                failures[index] = RetryableError(
                    f"message {message.id} failed transiently (test)",
                    retry_after=self._retry_after.get(message.id),
                )
            else:
                self.messages.append(message)
        self._notifier.notify()
        if failures:
            raise BatchError(failures)

    async def close(self) -> None:
        """Mark the sink closed (again: harmless)."""
        self.closed = True

    async def wait(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Wait until `count` messages were delivered; all delivered so far. TimeoutError
        (saying how many came) if they do not within `timeout` seconds."""
        await self._notifier.wait_for(
            count, self.messages, timeout, f"sink {self.config.name!r} delivered"
        )
        return list(self.messages)


class MemorySource(Source):
    """Publishes what the test pushes, as a source does: `push` returns once it is stored."""

    def __init__(self, config: MemorySourceConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self._context: SourceContext | None = None

    @property
    def running(self) -> bool:
        """True between start-up and stop."""
        return self._context is not None

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Take pushes until cancelled."""
        self._context = context
        try:
            task_status.started()
            await anyio.sleep_forever()
        finally:
            self._context = None

    async def push(
        self,
        body: bytes | str | Any,
        *,
        id: str | None = None,
        headers: Mapping[str, str] | None = None,
        subject: str | None = None,
    ) -> PublishAck:
        """Publish `body` on the source's subject (or `subject`) and wait until it is stored.

        The message id is `<source name>:<id>`, so pushing the same `id` again within the
        stream's duplicate window stores nothing new (`PublishAck.duplicate`); without an `id`
        each push is a new message. Raises PublishError as a real source would see it.
        """
        context = self._context
        if context is None:
            raise RuntimeError(f"source {self.config.name!r} is not running")
        message_id = f"{context.name}:{id if id is not None else uuid.uuid4().hex}"
        context.stats.received += 1
        ack = await context.publisher.publish(
            subject or self.config.subject,
            encode_body(body),
            headers={**(headers or {}), "Nats-Msg-Id": message_id},
        )
        context.stats.published += 1
        return ack


@dataclass
class MemoryHub:
    """The memory sinks and sources one harness built, by component name."""

    sinks: dict[str, MemorySink] = field(default_factory=dict)
    sources: dict[str, MemorySource] = field(default_factory=dict)

    def create_sink(self, config: MemorySinkConfig, context: BuildContext) -> MemorySink:
        sink = MemorySink(config, context)
        self.sinks[config.name] = sink
        return sink

    def create_source(self, config: MemorySourceConfig, context: BuildContext) -> MemorySource:
        source = MemorySource(config, context)
        self.sources[config.name] = source
        return source


def memory_adapter(hub: MemoryHub | None = None) -> Adapter[MemorySourceConfig, MemorySinkConfig]:
    """The `memory` adapter, recording the components it builds in `hub`."""
    hub = hub if hub is not None else MemoryHub()
    return Adapter(
        type="memory",
        source_config=MemorySourceConfig,
        create_source=hub.create_source,
        sink_config=MemorySinkConfig,
        create_sink=hub.create_sink,
    )
