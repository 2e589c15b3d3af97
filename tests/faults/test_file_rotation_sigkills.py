"""Rotation + SIGKILL: the append file sink, rotating every 2 KB, killed 10 times mid-flow.

The daemon (`busway run`) consumes a stream the test fills directly on its own nats-server
(fsync before every PubAck), so the kills hit busway alone. Its append sink rotates into
`archive/` every couple of KB, so most kills land near a rotation: before the rename, between
the rename and the new live file, or while messages written to the just-rotated file are
still un-acked and come back after the restart. Afterwards every message must be in the files
(the live one and every rotated one) exactly once.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import nats
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled
from tests.support import Daemon, NatsServer, eventually

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

KILLS = 10
PACE = 0.01  # seconds between two publishes of 5: about 500 messages a second
ROTATE_BYTES = 2048


def daemon_config(nats_url: str) -> str:
    return (
        config_toml(
            nats_url, top='shutdown_timeout = "5s"', streams=[stream_table("ROT_IN", "rotin.>")]
        )
        + f"""
[[sinks]]
name = "file"
type = "file"
from = "rotin.>"
path = "out/orders.jsonl"
rotate_bytes = {ROTATE_BYTES}
rotated_path = "archive/{{stem}}-{{start:%Y%m%dT%H%M%S}}{{suffix}}"
batch_size = 8
batch_wait = "1ms"
max_in_flight = 64
ack_wait = "1s"
"""
    )


def written(out: Path) -> list[int]:
    """The `n` of every line in the live file and the rotated ones, in no particular order."""
    numbers: list[int] = []
    for path in out.rglob("*.jsonl"):
        numbers.extend(orjson.loads(line)["n"] for line in path.read_bytes().splitlines())
    return numbers


def line_count(out: Path) -> int:
    """Complete lines in all the files now (the sink may be mid-write)."""
    return sum(path.read_bytes().count(b"\n") for path in out.rglob("*.jsonl"))


async def test_ten_sigkills_around_rotations_duplicate_no_line(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store, sync_always=True)
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url))
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    seed = int(os.environ.get("BUSWAY_FAULT_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    out = tmp_path / "out"
    kills: list[int] = []
    client = await nats.connect(server.url)
    js = client.jetstream()
    published = 0
    killing = True

    async def publish() -> None:
        """Publish at a steady pace while the killer works, so every kill lands mid-flow."""
        nonlocal published
        while killing:
            for n in range(published, published + 5):
                body = orjson.dumps({"n": n, "pad": "x" * rng.randrange(10, 60)})
                await js.publish("rotin.orders", body, headers={"Nats-Msg-Id": f"order-{n}"})
            published += 5
            await anyio.sleep(PACE)

    async def kill_repeatedly() -> None:
        nonlocal killing
        for _ in range(KILLS):
            before = line_count(out)

            async def flowing(before: int = before) -> bool:
                return line_count(out) > before

            await eventually(flowing, timeout=120)
            await anyio.sleep(rng.uniform(0, 0.5))
            daemon.kill()
            kills.append(line_count(out))
            daemon.start()
            await daemon.ready()
        killing = False

    try:
        daemon.start()
        await daemon.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)
            tg.start_soon(kill_repeatedly)

        async def drained() -> bool:
            return await consumer_settled(server.url, "ROT_IN", "busway-sink-file")

        await eventually(drained, timeout=180)
        assert await daemon.stop() == 0
    finally:
        await client.close()
        daemon.kill()
        server.stop()
    lines = written(out)
    figures = Figures.of(
        "rotation-sigkill:file",
        range(published),
        lines,
        kills=len(kills),
        rotated_files=len(list((out / "archive").iterdir())),
        seed=seed,
    ).report()
    print(f"[fault:rotation-sigkill] lines in the files at each kill {kills}")

    assert len(kills) == KILLS
    assert (figures.sent, figures.delivered, figures.lost, figures.duplicated) == (
        published,
        published,
        0,
        0,
    ), figures
    assert figures.extra["rotated_files"] >= KILLS  # rotations really happened throughout
