"""SIGKILL of the nats-server mid-flow, three times, while a Bus routes and writes to a file.

The server fsyncs before every PubAck (`sync_interval: always`) and comes back on the same
port with the same store. A producer keeps publishing with `Nats-Msg-Id` and retries what was
not confirmed; the Bus reconnects and goes on. What may be sent twice (a retried publish, a
route output republished after its input was redelivered) must be dropped by the streams'
deduplication: each stream and the file end with every message exactly once.

PubAcks lost with the killed server are failed at the reconnect (`fail_unconfirmed`), so the
route naks and republishes at once instead of waiting out `publish_timeout` per held message;
the default timeout is used.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import anyio
import nats
import nats.errors
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled, message_id, read_stream
from tests.support import NatsServer, decode_test_config, eventually

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

TOTAL = 10_000
KILLS = 3
PRODUCERS = 32


def bus_config(nats_url: str) -> str:
    return (
        config_toml(
            nats_url, streams=[stream_table("NK_IN", "nkin.>"), stream_table("NK_OUT", "nkout.>")]
        )
        + """
[[routes]]
name = "forward"
from = "nkin.orders"
transform = "{id: id}"
to = ["nkout.orders"]
ack_wait = "2s"
retry = { max_attempts = 1000, backoff = "100ms", max_backoff = "1s" }

[[sinks]]
name = "file"
type = "file"
from = "nkout.orders"
path = "out/orders.jsonl"
ack_wait = "2s"
retry = { max_attempts = 1000, backoff = "100ms", max_backoff = "1s" }
circuit = { failures = 0 }
"""
    )


class Producer:
    """Publishes 0..TOTAL-1, each with its own `Nats-Msg-Id`, retrying until confirmed."""

    def __init__(self, client: NatsClient) -> None:
        self.js = client.jetstream()
        self.confirmed = 0
        self.retries = 0
        self._next = 0

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(PRODUCERS):
                tg.start_soon(self._worker)

    async def _worker(self) -> None:
        while self._next < TOTAL:
            n = self._next
            self._next += 1
            while True:
                try:
                    await self.js.publish(
                        "nkin.orders",
                        orjson.dumps({"id": n}),
                        timeout=2,
                        headers={"Nats-Msg-Id": f"order-{n}"},
                    )
                except (nats.errors.Error, TimeoutError):
                    self.retries += 1
                    await anyio.sleep(0.1)
                else:
                    self.confirmed += 1
                    break


async def test_nats_server_sigkills_lose_nothing_and_duplicates_are_dropped(
    tmp_path: Path,
) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store, sync_always=True)
    port = server.port
    config = decode_test_config(bus_config(server.url), tmp_path)
    seed = int(os.environ.get("BUSWAY_FAULT_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(TOTAL // 10, TOTAL * 8 // 10), KILLS))
    kills: list[int] = []
    try:
        producer_client = await nats.connect(
            server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        producer = Producer(producer_client)
        async with Bus(config) as bus:

            async def killer() -> None:
                nonlocal server
                for threshold in thresholds:

                    async def reached(threshold: int = threshold) -> bool:
                        return producer.confirmed >= threshold

                    await eventually(reached, timeout=240)
                    server.process.send_signal(signal.SIGKILL)
                    server.process.wait()
                    kills.append(producer.confirmed)
                    await anyio.sleep(rng.uniform(0.2, 1.0))  # down for a moment
                    server = await anyio.to_thread.run_sync(
                        lambda: NatsServer(store, sync_always=True, port=port)
                    )

            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                tg.start_soon(producer.run)

            async def drained() -> bool:
                return await consumer_settled(
                    server.url, "NK_IN", "busway-route-forward"
                ) and await consumer_settled(server.url, "NK_OUT", "busway-sink-file")

            await eventually(drained, timeout=180)
            stats = {each.name: each for each in bus.metrics.stats}
            route, sink = stats["forward"], stats["file"]
            retried = (route.retried, sink.retried)
            dead = (route.dead_lettered, sink.dead_lettered)
        await producer_client.close()
        inputs = await read_stream(server.url, "NK_IN")
        outputs = await read_stream(server.url, "NK_OUT")
    finally:
        server.stop()

    lines = (tmp_path / "out" / "orders.jsonl").read_bytes().splitlines()
    sent = range(TOTAL)
    figures = [
        Figures.of("nats-kill:input-stream", sent, [orjson.loads(m.data)["id"] for m in inputs]),
        Figures.of("nats-kill:output-stream", sent, [orjson.loads(m.data)["id"] for m in outputs]),
        Figures.of(
            "nats-kill:file",
            sent,
            [orjson.loads(line)["id"] for line in lines],
            kills=len(kills),
            publish_retries=producer.retries,
            retried_route_sink=retried,
            seed=seed,
        ),
    ]
    for each in figures:
        each.report()
    print(f"[fault:nats-kill] killed at confirmed counts {kills}")

    assert len(kills) == KILLS
    for each in figures:
        assert (each.delivered, each.lost, each.duplicated) == (TOTAL, 0, 0), each
    assert dead == (0, 0)
    # Exact counts: the streams hold each message once, under its deterministic id.
    assert len(inputs) == len(outputs) == TOTAL
    assert sorted(message_id(m) for m in inputs) == sorted(f"order-{n}" for n in sent)
    assert len({message_id(m) for m in outputs}) == TOTAL
