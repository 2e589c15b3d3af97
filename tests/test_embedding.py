"""Embedding busway: an application registers its own sink, and the engine keeps its contract.

The sink here is the application's own code (in memory, by design); NATS is real. It answers
each batch with the per-message outcomes a sink may report, and the test checks what the engine
does with each: delivered = acked, retryable = redelivered later, permanent = dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec
import orjson
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient

from busway import (
    Adapter,
    AdapterRegistry,
    BatchError,
    BuildContext,
    Bus,
    DeliveryError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    SinkConfig,
    Source,
    SourceConfig,
    SourceContext,
    decode_config,
)
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, stream_messages, wait_settled

pytestmark = pytest.mark.anyio


class MemorySinkConfig(SinkConfig, tag="memory", frozen=True, kw_only=True):
    """Config of the application's sink: which bodies to reject."""

    reject: list[str] = msgspec.field(default_factory=list)
    flaky: list[str] = msgspec.field(default_factory=list)


class MemorySink(Sink):
    """Keeps delivered bodies; rejects `reject` for good and fails `flaky` once."""

    def __init__(self, config: MemorySinkConfig, context: BuildContext) -> None:
        self.config = config
        self.delivered: list[str] = []
        self.failed_once: set[str] = set()
        self.attempts: dict[str, list[int]] = {}

    async def write(self, batch: Sequence[Message]) -> None:
        failures: dict[int, DeliveryError] = {}
        for index, message in enumerate(batch):
            name = orjson.loads(message.data)["name"]
            self.attempts.setdefault(name, []).append(message.attempt)
            if name in self.config.reject:
                failures[index] = PermanentError(f"{name} is not accepted here")
            elif name in self.config.flaky and name not in self.failed_once:
                self.failed_once.add(name)
                failures[index] = RetryableError("peer busy", retry_after=0.05)
            else:
                self.delivered.append(name)
        if failures:
            raise BatchError(failures)


async def test_custom_sink_outcomes_are_acked_retried_or_dead_lettered(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    registry = AdapterRegistry(
        [Adapter(type="memory", sink_config=MemorySinkConfig, create_sink=MemorySink)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(f"APP_{unique}", f"app{unique}.>")])
        + f"""
[[sinks]]
name = "mem{unique}"
type = "memory"
from = "app{unique}.>"
reject = ["bad"]
flaky = ["slow"]
retry = {{ backoff = "10ms", max_backoff = "50ms" }}
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, registry=registry)
    sink = bus.plan.sinks[0][1]
    assert isinstance(sink, MemorySink)
    js = nc.jetstream()
    async with bus:
        for name in ("a", "bad", "slow", "b"):
            await js.publish(f"app{unique}.x", orjson.dumps({"name": name}))

        await wait_settled(nc, f"APP_{unique}", f"busway-sink-mem{unique}")
        stats = bus.metrics.stats[0]
        assert (stats.published, stats.retried, stats.dead_lettered) == (3, 1, 1)

    assert sorted(sink.delivered) == ["a", "b", "slow"]
    assert sink.attempts["slow"] == [1, 2]
    assert sink.attempts["bad"] == [1]
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.mem{unique}"
    ]
    assert [orjson.loads(m.data)["name"] for m in dead] == ["bad"]
    assert dead[0].headers
    assert dead[0].headers["Busway-Error"] == "bad is not accepted here"
    assert dead[0].headers["Busway-Component-Kind"] == "sink"


def test_an_adapter_must_give_config_and_factory_together() -> None:
    with pytest.raises(TypeError, match="give both sink_config and create_sink"):
        Adapter(type="broken", sink_config=MemorySinkConfig)


class SlowSinkConfig(SinkConfig, tag="slow", frozen=True, kw_only=True):
    """Config of a sink that takes `delay` seconds per batch."""

    delay: float = 0.0


class SlowSink(Sink):
    """Records every delivery attempt; each batch takes `delay` seconds."""

    def __init__(self, config: SlowSinkConfig, context: BuildContext) -> None:
        self.delay = config.delay
        self.seen: list[tuple[str, int]] = []

    async def write(self, batch: Sequence[Message]) -> None:
        self.seen.extend((message.id, message.attempt) for message in batch)
        await anyio.sleep(self.delay)


async def test_messages_held_longer_than_ack_wait_are_not_redelivered(
    nats_server: NatsServer, nc: NatsClient, unique: str
) -> None:
    """The engine keeps held messages alive (+WPI) while a slow sink works on them."""
    registry = AdapterRegistry(
        [Adapter(type="slow", sink_config=SlowSinkConfig, create_sink=SlowSink)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(f"SLOW_{unique}", f"slow{unique}.>")])
        + f"""
[[sinks]]
name = "slow{unique}"
type = "slow"
from = "slow{unique}.>"
ack_wait = "1s"
delay = 3.5
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, registry=registry)
    sink = bus.plan.sinks[0][1]
    assert isinstance(sink, SlowSink)
    async with bus:
        await nc.jetstream().publish(f"slow{unique}.x", b"{}")

        await wait_settled(nc, f"SLOW_{unique}", f"busway-sink-slow{unique}")
    assert sink.seen == [(f"SLOW_{unique}:1", 1)]


class CountingSourceConfig(SourceConfig, tag="counting", frozen=True, kw_only=True):
    """Config of a source that publishes `count` numbered messages, resuming from its state."""

    count: int


class CountingSource(Source):
    """Publishes messages pipelined and records its progress in the state store."""

    def __init__(self, config: CountingSourceConfig, context: BuildContext) -> None:
        self.config = config
        self.published = anyio.Event()

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        start = int(await context.state.get("next") or b"0")
        confirmations = [
            await context.publisher.publish_pipelined(
                self.config.subject,
                orjson.dumps({"n": n}),
                headers={"Nats-Msg-Id": f"counting:{n}"},
            )
            for n in range(start, start + self.config.count)
        ]
        for confirmation in confirmations:
            await confirmation
        await context.state.put("next", str(start + self.config.count).encode())
        self.published.set()
        await anyio.sleep_forever()


async def test_source_publishes_pipelined_and_resumes_from_its_durable_state(
    nats_server: NatsServer, nc: NatsClient, unique: str
) -> None:
    registry = AdapterRegistry(
        [Adapter(type="counting", source_config=CountingSourceConfig, create_source=CountingSource)]
    )
    config = decode_config(
        config_toml(
            nats_server,
            top={"state_bucket": f"state_{unique}"},
            streams=[stream_table(f"COUNT_{unique}", f"count{unique}.>")],
        )
        + f"""
[[sources]]
name = "counter"
type = "counting"
subject = "count{unique}.n"
count = 300
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    for _ in range(2):
        bus = Bus(config, registry=registry)
        source = bus.plan.sources[0][1]
        assert isinstance(source, CountingSource)
        async with bus:
            await source.published.wait()
    stored = await stream_messages(nc, f"COUNT_{unique}")
    assert [orjson.loads(m.data)["n"] for m in stored] == list(range(600))
