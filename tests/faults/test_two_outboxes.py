"""Two outboxes with the same table name, in two databases, publish into one stream.

Two services each keep the default `busway_outbox` in their own SQLite database, with ids
from 1 up in both, and one daemon (`busway run`) publishes both outboxes into one stream.
While the applications insert rows, the daemon is SIGKILLed at random points and restarted:
rows published but not yet deleted are published again and must be dropped as copies of
themselves, never mistaken for the other outbox's rows (which the stream would drop, and the
outbox would then delete: lost). Every row of both outboxes must be in the stream once.
"""

from __future__ import annotations

import os
import random
import sqlite3
from pathlib import Path

import anyio
import anyio.to_thread
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, message_id, read_stream
from tests.support import REPO, Daemon, NatsServer, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(300)]

ROWS = int(os.environ.get("BUSWAY_FAULT_OUTBOX_ROWS", "3000"))  # per outbox
KILLS = 5
BATCH = 20  # rows per application transaction
OUTBOXES = ("billing", "shipping")


def daemon_config(nats_url: str, databases: dict[str, Path]) -> str:
    sources = "".join(
        f"""
[[sources]]
name = "{name}-outbox"
type = "sqlite"
path = "{path}"
mode = "outbox"
subject = "{{subject}}"
batch_size = 100
interval = "50ms"
"""
        for name, path in databases.items()
    )
    return config_toml(
        nats_url,
        top='shutdown_timeout = "5s"',
        streams=[stream_table("EVENTS", "events.>", duplicate_window="10m")],
        body=sources,
    )


def create_outbox(path: Path) -> None:
    """The shipped DDL, unchanged: both databases get the default `busway_outbox`."""
    with sqlite3.connect(path) as connection:
        connection.executescript((REPO / "deploy" / "sql" / "outbox.sqlite.sql").read_text())


def insert(path: Path, name: str, numbers: range) -> None:
    """One application transaction adding rows `numbers` to the outbox at `path`."""
    connection = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        connection.execute("BEGIN IMMEDIATE")
        connection.executemany(
            "INSERT INTO busway_outbox (subject, payload) VALUES (?, ?)",
            [(f"events.{name}", orjson.dumps({"db": name, "n": n})) for n in numbers],
        )
        connection.execute("COMMIT")
    finally:
        connection.close()


def remaining(path: Path) -> int:
    with sqlite3.connect(path, timeout=30) as connection:
        (count,) = connection.execute("SELECT count(*) FROM busway_outbox").fetchone()
    return int(count)


async def test_two_outboxes_into_one_stream_survive_sigkills_without_loss(
    tmp_path: Path,
) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store)
    databases = {name: tmp_path / f"{name}.db" for name in OUTBOXES}
    for path in databases.values():
        create_outbox(path)
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url, databases))
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    seed = int(os.environ.get("BUSWAY_FAULT_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(ROWS // 10, ROWS - ROWS // 10), KILLS))
    inserted = 0  # rows of each outbox committed so far
    kills: list[int] = []

    async def applications() -> None:
        nonlocal inserted
        for start in range(0, ROWS, BATCH):
            numbers = range(start, min(start + BATCH, ROWS))
            for name, path in databases.items():
                await anyio.to_thread.run_sync(insert, path, name, numbers)
            inserted = numbers.stop
            await anyio.sleep(0.02)  # pacing: the rows arrive over the whole run

    async def killer() -> None:
        for threshold in thresholds:

            async def reached(threshold: int = threshold) -> bool:
                return inserted >= threshold

            await eventually(reached, timeout=120)
            await anyio.sleep(rng.uniform(0, 0.3))  # somewhere in a claim, not on a boundary
            daemon.kill()
            kills.append(inserted)
            daemon.start()
            await daemon.ready()

    try:
        daemon.start()
        await daemon.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            tg.start_soon(applications)

        async def drained() -> bool:
            counts = [await anyio.to_thread.run_sync(remaining, p) for p in databases.values()]
            return counts == [0] * len(databases)

        await eventually(drained, timeout=120)
        assert await daemon.stop() == 0
        stored = await read_stream(server.url, "EVENTS")
    finally:
        daemon.kill()
        server.stop()

    sent = [(name, n) for name in OUTBOXES for n in range(ROWS)]
    arrived = [(body["db"], body["n"]) for body in (orjson.loads(m.data) for m in stored)]
    figures = Figures.of(
        "two-outboxes", sent, arrived, kills=len(kills), restarts=daemon.starts - 1, seed=seed
    ).report()
    print(f"[fault:two-outboxes] killed at inserted counts {kills}")

    assert len(kills) == KILLS
    assert (figures.sent, figures.delivered, figures.lost, figures.duplicated) == (
        2 * ROWS,
        2 * ROWS,
        0,
        0,
    ), figures
    # Both outboxes count ids from 1: the source name keeps their messages apart.
    assert sorted(message_id(m) for m in stored) == sorted(
        f"{name}-outbox:busway_outbox:{i}" for name in OUTBOXES for i in range(1, ROWS + 1)
    )
