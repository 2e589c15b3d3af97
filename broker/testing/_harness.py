"""`start_bus`: a whole bus for a test, on its own embedded nats-server, in a few lines.

    async with start_bus(TOML) as harness:
        async with harness.collect("orders.>") as got:
            await harness.publish("orders.new", {"id": 1})
            [message] = await got.wait(1)

The bus is the real one (`busway.Bus`): real JetStream, real routes and adapters, the same
start-up and shutdown. Only what would make tests collide is changed: the embedded server
listens on a free loopback port with its store in the harness directory, and the HTTP
listener (if any) on a free port. A config with `[nats] servers` keeps them.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import anyio
import msgspec
import orjson

from busway._bus import Bus
from busway._components import Message, PublishAck
from busway._config.model import Config, decode_config
from busway._nats.tap import Tap
from busway._observe.metrics import ComponentStats
from busway._registry import Adapter, AdapterRegistry
from busway.testing._memory import (
    MemoryHub,
    MemorySink,
    MemorySource,
    Notifier,
    encode_body,
    memory_adapter,
)

__all__ = ["Collected", "Harness", "eventually", "harness_registry", "start_bus"]

_LOOPBACK_ANY_PORT = "127.0.0.1:0"


def harness_registry(
    adapters: Iterable[Adapter] = (), *, hub: MemoryHub | None = None
) -> AdapterRegistry:
    """Every installed adapter, plus `memory` (recording into `hub`) and `adapters`.

    A new registry each call: the process-wide `busway.default_registry()` is not changed. A
    `memory` adapter among `adapters` (one recording into the test's own hub) replaces the
    harness's; any other type name registered twice is a ConfigError.
    """
    registry = AdapterRegistry.from_entry_points()
    registry.register(memory_adapter(hub))
    for adapter in adapters:
        registry.register(adapter, replace=adapter.type == "memory")
    return registry


class Collected:
    """The messages stored on a subject since `Harness.collect` began, in stream order."""

    def __init__(self, subject: str) -> None:
        self.subject = subject
        self.messages: list[Message] = []
        """What was stored so far, each stored message once."""
        self._notifier = Notifier()

    def _add(self, message: Message) -> None:
        self.messages.append(message)
        self._notifier.notify()

    @property
    def ids(self) -> list[str]:
        """The message ids (`Nats-Msg-Id`) of `messages`."""
        return [message.id for message in self.messages]

    def bodies(self) -> list[Any]:
        """The JSON-decoded bodies of `messages`."""
        return [orjson.loads(message.data) for message in self.messages]

    async def wait(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Wait until at least `count` messages were stored; all of them so far.

        TimeoutError saying how many came if fewer than `count` do within `timeout` seconds.
        """
        await self._notifier.wait_for(
            count, self.messages, timeout, f"messages stored on {self.subject!r}"
        )
        return list(self.messages)


class Harness:
    """A running bus and a test's handles on it: publish, collect, memory components."""

    def __init__(
        self, *, bus: Bus, tap: Tap, hub: MemoryHub, path: Path, registry: AdapterRegistry
    ) -> None:
        self.bus = bus
        """The running `busway.Bus`."""
        self.path = path
        """The harness directory: the embedded server's store, and where relative paths of a
        TOML config start."""
        self.registry = registry
        """The adapters the bus was built with (installed ones, `memory`, and yours)."""
        self._tap = tap
        self._hub = hub

    @property
    def config(self) -> Config:
        """The config the bus runs (with the harness's ports and directories)."""
        return self.bus.config

    @property
    def nats_url(self) -> str:
        """The URL of the bus's NATS server."""
        assert self.bus.nats_url is not None
        return self.bus.nats_url

    @property
    def http_url(self) -> str:
        """The base URL of the bus's HTTP listener (`http://127.0.0.1:<port>`)."""
        if self.bus.http_port is None:
            raise RuntimeError("this bus serves no HTTP: its config sets [http] listen = ''")
        scheme = "https" if self.config.http.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{self.bus.http_port}"

    async def publish(
        self,
        subject: str,
        body: bytes | str | Any,
        *,
        id: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> PublishAck:
        """Store `body` on `subject` as an outside producer would, and wait for the PubAck.

        `body`: bytes as they are, text as UTF-8, anything else as JSON. `id` becomes the
        `Nats-Msg-Id` (the stream drops a repeat within its duplicate window).
        Raises PublishError if JetStream does not confirm it (e.g. no stream captures it).
        """
        all_headers = dict(headers or {})
        if id is not None:
            all_headers["Nats-Msg-Id"] = id
        return await self._tap.publish(subject, encode_body(body), headers=all_headers)

    @contextlib.asynccontextmanager
    async def collect(self, subject: str) -> AsyncIterator[Collected]:
        """Collect what JetStream stores on `subject` (wildcards allowed) while the block runs.

        Messages stored before the block began are not included; use `stored` for those.
        ValueError if no stream captures `subject`.
        """
        collected = Collected(subject)
        async with self._tap.follow(subject, collected._add):
            yield collected

    async def stored(self, stream: str) -> list[Message]:
        """Every message `stream` holds now, in order."""
        return await self._tap.stored(stream)

    def sink(self, name: str) -> MemorySink:
        """The `memory` sink named `name` (KeyError naming the ones there are)."""
        try:
            return self._hub.sinks[name]
        except KeyError:
            raise KeyError(
                f"no memory sink {name!r}; there are {sorted(self._hub.sinks)}"
            ) from None

    def source(self, name: str) -> MemorySource:
        """The `memory` source named `name` (KeyError naming the ones there are)."""
        try:
            return self._hub.sources[name]
        except KeyError:
            raise KeyError(
                f"no memory source {name!r}; there are {sorted(self._hub.sources)}"
            ) from None

    def stats(self, name: str) -> ComponentStats:
        """The counters of the source, route or sink named `name` (KeyError if none)."""
        for stats in self.bus.metrics.stats:
            if stats.name == name:
                return stats
        raise KeyError(f"no component named {name!r}")


async def eventually(
    check: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, *, what: str = ""
) -> None:
    """Poll `check` (plain or async) until it is true; TimeoutError after `timeout` seconds.

    For conditions nobody signals (a file appearing, a row committed); prefer `Collected.wait`
    and `MemorySink.wait` where they apply.
    """
    deadline = time.monotonic() + timeout
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if time.monotonic() > deadline:
            name = what or getattr(check, "__name__", "condition")
            raise TimeoutError(f"{name} not met within {timeout:g}s")
        await anyio.sleep(0.02)


def _isolated(config: Config, directory: Path) -> Config:
    """`config` on free loopback ports, its embedded server's store under `directory`."""
    nats = config.nats
    if nats.servers is None:
        nats = msgspec.structs.replace(
            nats, listen=_LOOPBACK_ANY_PORT, data_dir=str(directory / "nats")
        )
    http = config.http
    if http.listen:
        http = msgspec.structs.replace(http, listen=_LOOPBACK_ANY_PORT)
    return msgspec.structs.replace(config, nats=nats, http=http)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return found


def _directory(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.asynccontextmanager
async def start_bus(
    config: str | Config,
    *,
    adapters: Iterable[Adapter] = (),
    directory: str | os.PathLike[str] | None = None,
    environ: dict[str, str] | None = None,
) -> AsyncIterator[Harness]:
    """Run a bus for `config` (TOML text or a `Config`) until the block ends.

    `adapters` are registered beside the installed ones and `memory`. `directory` holds the
    embedded server's store (a temporary directory, removed afterwards, if not given: give
    the same one to two harnesses in turn to restart a bus on its store); relative paths of a
    TOML config start there. `environ` resolves `${VAR}` in TOML (default: the process's).

    Raises ConfigError for a bad config and StartupError if the bus cannot start, as
    `busway.Bus` does.
    """
    with contextlib.ExitStack() as stack:
        if directory is None:
            path = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="busway-test-")))
        else:
            path = _directory(directory)
        hub = MemoryHub()
        registry = harness_registry(adapters, hub=hub)
        if isinstance(config, str):
            config = decode_config(
                config,
                file="<test config>",
                base_dir=str(path),
                source_types=registry.source_config,
                sink_types=registry.sink_config,
                environ=environ,
            )
        bus = Bus(_isolated(config, path), registry=registry)
        try:
            async with bus:
                assert bus.nats_url is not None
                tap = await Tap.connect(bus.config, bus.nats_url)
                try:
                    yield Harness(bus=bus, tap=tap, hub=hub, path=path, registry=registry)
                finally:
                    with anyio.CancelScope(shield=True):
                        await tap.close()
        except BaseExceptionGroup as group:
            # The bus's task group wraps what the test body raised: an assertion failing
            # inside the block should read as that assertion, not as an ExceptionGroup.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
