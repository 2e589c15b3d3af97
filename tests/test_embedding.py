"""Embedding busway: an application registers its own sink, and the engine keeps its contract.

The sink here is the application's own code (in memory, by design); NATS is real. It answers
each batch with the per-message outcomes a sink may report, and the test checks what the engine
does with each: delivered = acked, retryable = redelivered later, permanent = dead-lettered.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec
import orjson
import pytest
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
    decode_config,
)
from tests.support import NatsServer, consumer_settled, eventually, stream_messages

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
        f"""
[nats]
servers = ["{nats_server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "APP_{unique}"
subjects = ["app{unique}.>"]

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

        async def settled() -> bool:
            return await consumer_settled(nc, f"APP_{unique}", f"busway-sink-mem{unique}")

        await eventually(settled)
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
