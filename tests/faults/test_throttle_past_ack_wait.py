"""A `throttle` that holds messages several times longer than the route's `ack_wait`.

Before, a message waiting for its turn was not kept alive: JetStream redelivered it after
`ack_wait` while the throttle still held it, the copy burned an attempt, and with a small
`max_attempts` healthy messages were dead-lettered while their first delivery went through
("delivered and dead-lettered"). Now every held message is refreshed with `+WPI` within half
of `ack_wait`: all are delivered exactly once, none is redelivered or dead-lettered.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, read_stream
from tests.support import NatsServer, decode_test_config, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

COUNT = 12  # at 2 per second after a burst of 2: the last one waits about 5 s


async def test_throttled_messages_outlive_ack_wait_without_redelivery(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        config_toml(
            nats_server,
            streams=[
                stream_table(f"THR_{unique}", f"thr{unique}.in"),
                stream_table(f"THROUT_{unique}", f"thr{unique}.out"),
            ],
        )
        + f"""
[[routes]]
name = "r{unique}"
from = "thr{unique}.in"
to = ["thr{unique}.out"]
ack_wait = "1s"
max_in_flight = 64
retry = {{ max_attempts = 2, backoff = "50ms" }}
stages = [{{ throttle = {{ rate = 2, per = "1s" }} }}]
""",
        tmp_path,
    )
    js = nc.jetstream()
    durable = f"busway-route-r{unique}"
    async with Bus(config) as bus:
        for n in range(COUNT):
            await js.publish(f"thr{unique}.in", orjson.dumps({"n": n}))
        await wait_settled(nc, f"THR_{unique}", durable, timeout=60)
        info = await js.consumer_info(f"THR_{unique}", durable)
        stats = bus.metrics.stats[0]
        retried, dead = stats.retried, stats.dead_lettered

    delivered = [
        orjson.loads(m.data)["n"] for m in await read_stream(nats_server.url, f"THROUT_{unique}")
    ]
    dead_letters = [
        m
        for m in await read_stream(nats_server.url, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.r{unique}"
    ]
    Figures.of(
        "throttle-past-ack-wait",
        range(COUNT),
        delivered,
        redelivered=info.num_redelivered,
        dead_lettered=len(dead_letters),
    ).report()

    assert sorted(delivered) == list(range(COUNT))
    assert info.num_redelivered == 0
    assert (retried, dead) == (0, 0)
    assert dead_letters == []
