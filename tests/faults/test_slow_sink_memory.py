"""A slow sink with 200,000 messages backed up behind it: memory stays bounded.

The backlog waits in JetStream, not in busway: the sink's consumer holds at most
`max_in_flight` messages, so the process' RSS hardly moves whether 1,000 or 200,000 are
waiting. The sink is the application's own (slow on purpose, then fast so the backlog drains);
at the end every message was delivered exactly once.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import nats
import pytest
from nats.aio.msg import Msg

from busway import (
    Adapter,
    AdapterRegistry,
    BuildContext,
    Bus,
    Message,
    Sink,
    SinkConfig,
    decode_config,
)
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, rss_mib
from tests.support import NatsServer, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow]

TOTAL = 200_000
MAX_IN_FLIGHT = 1024
RSS_BOUND_MIB = 300.0
SLOW_SECONDS = 3.0


class PacedSinkConfig(SinkConfig, tag="paced", frozen=True, kw_only=True):
    """A sink that sleeps `delay` seconds per batch until told to hurry."""

    delay: float


class PacedSink(Sink):
    """Counts deliveries per stream sequence in a flat array (no per-message objects)."""

    def __init__(self, config: PacedSinkConfig, context: BuildContext) -> None:
        self.delay = config.delay
        self.counts = bytearray(TOTAL + 1)
        self.delivered = 0

    async def write(self, batch: Sequence[Message]) -> None:
        if self.delay:
            await anyio.sleep(self.delay)
        counts = self.counts
        for message in batch:
            counts[message.sequence] = min(counts[message.sequence] + 1, 255)
        self.delivered += len(batch)


async def preload(url: str, stream: str, subject: str) -> None:
    """Store TOTAL messages fast: core publishes whose PubAcks arrive on one wildcard inbox.

    nats-py's `publish_async` costs a future and a timer per message; counting the answers on
    one subscription confirms the same in a fraction of the time. Every message must be
    confirmed (a refusal fails the test: this is set-up, not the fault under test).
    """
    client = await nats.connect(url)
    try:
        await client.jetstream().add_stream(name=stream, subjects=[f"{subject.split('.')[0]}.>"])
        body = b'{"order": "%d", "note": "a message waiting behind a slow sink"}'
        inbox = client.new_inbox()
        confirmed = anyio.Event()
        acks: list[int] = [0]
        refusals: list[bytes] = []

        async def on_ack(message: Msg) -> None:
            if b'"error"' in message.data:
                refusals.append(message.data)
            acks[0] += 1
            if acks[0] == TOTAL:
                confirmed.set()

        subscription = await client.subscribe(inbox, cb=on_ack, pending_msgs_limit=-1)
        for n in range(TOTAL):
            await client.publish(subject, body % n, reply=inbox)
            if n % 2000 == 1999:
                await client.flush()  # keep the socket's buffer small
        with anyio.fail_after(60):
            await confirmed.wait()
        await subscription.unsubscribe()
        assert not refusals, refusals[:3]
    finally:
        await client.close()


async def test_backlog_behind_a_slow_sink_keeps_memory_bounded(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    stream, subject = f"SLOWMEM_{unique}", f"slowmem{unique}.orders"
    gc.collect()
    start = rss_mib()  # the preload's garbage counts as growth: a conservative figure
    t0 = time.monotonic()
    await preload(nats_server.url, stream, subject)
    preloaded = time.monotonic() - t0
    registry = AdapterRegistry(
        [Adapter(type="paced", sink_config=PacedSinkConfig, create_sink=PacedSink)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(stream, f"slowmem{unique}.>")])
        + f"""
[[sinks]]
name = "paced{unique}"
type = "paced"
from = "{subject}"
delay = 0.25
max_in_flight = {MAX_IN_FLIGHT}
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    gc.collect()
    before = peak = rss_mib()
    bus = Bus(config, registry=registry)
    sink = bus.plan.sinks[0][1]
    assert isinstance(sink, PacedSink)
    max_in_flight = 0
    async with bus:
        stats = bus.metrics.stats[0]

        async def sample() -> None:
            nonlocal peak, max_in_flight
            while True:
                peak = max(peak, rss_mib())
                max_in_flight = max(max_in_flight, stats.in_flight)
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(sample)
            await anyio.sleep(SLOW_SECONDS)  # the backlog waits behind the slow sink
            slow_delivered = sink.delivered
            sink.delay = 0  # the peer recovers: the backlog drains
            t1 = time.monotonic()
            client = await nats.connect(nats_server.url)
            try:
                await wait_settled(client, stream, f"busway-sink-paced{unique}", timeout=180)
            finally:
                await client.close()
            drained = time.monotonic() - t1
            tg.cancel_scope.cancel()
    after = rss_mib()

    counts = sink.counts
    figures = Figures.of(
        "slow-sink",
        range(1, TOTAL + 1),
        (seq for seq in range(1, TOTAL + 1) for _ in range(counts[seq])),
        delivered_while_slow=slow_delivered,
        preload_s=round(preloaded, 1),
        drain_s=round(drained, 1),
        rss_start_mib=round(start, 1),
        rss_before_bus_mib=round(before, 1),
        rss_peak_mib=round(peak, 1),
        rss_after_mib=round(after, 1),
        growth_mib=round(peak - start, 1),
        max_in_flight_seen=max_in_flight,
    ).report()

    assert slow_delivered < TOTAL // 4, "the sink must be slow enough for a backlog to form"
    assert (figures.delivered, figures.lost, figures.duplicated) == (TOTAL, 0, 0)
    assert max_in_flight <= MAX_IN_FLIGHT
    assert peak - start < RSS_BOUND_MIB
