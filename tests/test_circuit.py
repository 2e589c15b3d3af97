"""The sink circuit breaker: its state machine, and a sink that is down then back."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import generate_latest

from busway import (
    Adapter,
    AdapterRegistry,
    BuildContext,
    Bus,
    Message,
    RetryableError,
    Sink,
    SinkConfig,
    decode_config,
)
from busway._egress.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, eventually, wait_settled


def test_opens_after_consecutive_failures_probes_then_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=3, cool_down=10.0, clock=lambda: now[0])
    assert not breaker.failed()
    breaker.succeeded()  # a success resets the count
    assert not breaker.failed()
    assert not breaker.failed()
    assert breaker.failed()  # third in a row: opens
    assert breaker.state == OPEN
    now[0] = 4.0
    assert breaker.wait_time() == 6.0
    now[0] = 10.0
    assert breaker.wait_time() == 0.0
    assert breaker.state == HALF_OPEN
    assert breaker.failed()  # a failed probe opens it again at once
    assert breaker.state == OPEN
    now[0] = 20.0
    assert breaker.wait_time() == 0.0
    breaker.succeeded()
    assert breaker.state == CLOSED


def test_zero_failures_disables_it() -> None:
    breaker = CircuitBreaker(failures=0, cool_down=1.0)
    assert not any(breaker.failed() for _ in range(100))
    assert breaker.state == CLOSED


class DownSinkConfig(SinkConfig, tag="down-then-up", frozen=True, kw_only=True):
    """A sink that fails while `down` is set on it by the test."""


class DownSink(Sink):
    """The application's peer: failing (transiently) until the test brings it back."""

    def __init__(self, config: DownSinkConfig, context: BuildContext) -> None:
        self.down = True
        self.calls: list[tuple[float, int]] = []
        self.delivered: list[int] = []

    async def write(self, batch: Sequence[Message]) -> None:
        self.calls.append((time.monotonic(), len(batch)))
        if self.down:
            raise RetryableError("peer unreachable")
        self.delivered.extend(orjson.loads(m.data)["n"] for m in batch)


@pytest.mark.anyio
async def test_an_open_circuit_stops_delivery_then_everything_arrives_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    sinks: list[DownSink] = []

    def create(config: DownSinkConfig, context: BuildContext) -> DownSink:
        sinks.append(DownSink(config, context))
        return sinks[-1]

    registry = AdapterRegistry(
        [Adapter(type="down-then-up", sink_config=DownSinkConfig, create_sink=create)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(f"S_{unique}", f"s{unique}.>")])
        + f"""
[[sinks]]
name = "k{unique}"
type = "down-then-up"
from = "s{unique}.out"
batch_size = 10
circuit = {{ failures = 2, cool_down = "1s" }}
retry = {{ max_attempts = 1000, backoff = "50ms", max_backoff = "100ms" }}
""",
        base_dir=str(tmp_path),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    async with Bus(config, registry=registry) as bus:
        [sink] = sinks
        stats = bus.metrics.stats[0]
        js = nc.jetstream()
        for n in range(20):
            await js.publish(f"s{unique}.out", orjson.dumps({"n": n}))

        async def opened() -> bool:
            return stats.circuit == OPEN

        await eventually(opened)
        assert not bus.readiness()[f"sink:k{unique}"]
        metrics = generate_latest(bus.metrics_registry).decode()
        assert f'busway_circuit_state{{component="k{unique}",kind="sink"}} 1.0' in metrics
        opened_at = sink.calls[-1][0]
        await anyio.sleep(0.5)
        # Open: nothing is tried during the cool-down (a lower bound, safe on a slow machine).
        assert sink.calls[-1][0] == opened_at
        sink.down = False
        await wait_settled(nc, f"S_{unique}", f"busway-sink-k{unique}")
        probe_at, probe_size = next((at, size) for at, size in sink.calls if at > opened_at)
        assert probe_at - opened_at >= 0.9
        assert probe_size == 1  # half-open: one message probes the peer
        assert stats.circuit == CLOSED
        assert bus.readiness()[f"sink:k{unique}"]
    assert sorted(sink.delivered) == list(range(20))
