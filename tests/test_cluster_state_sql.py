"""Two daemons on one incremental database source: one polls, each row is published once.

Before the lease, both daemons polled: every row was published twice (the stream's dedup hid
it only within its window) and each daemon stored its own watermark, moving it backwards.
Here the sum of both daemons' PubAcks must equal the row count (a row published by both
would count twice), every `Nats-Msg-Id` is in the stream once, and the stored watermark,
watched through every write, never goes back. Then the holder is killed with SIGKILL and the
standby takes over within the lease's bound, losing and duplicating nothing.
"""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from anyio.abc import TaskGroup
from nats.aio.client import Client as NatsClient

from busway import Bus
from busway._nats.jetstream import state_bucket
from tests.faults.helpers import message_id
from tests.sql.engines import Engine, PostgresEngine, SqliteEngine
from tests.sql.helpers import bus_config, source_table
from tests.sql.servers import PostgresServer
from tests.support import Daemon, NatsServer, decode_test_config, eventually, stream_messages

pytestmark = pytest.mark.anyio

TTL = 1.0
"""The lease ttl of these tests: a dead holder is replaced within 1.5 * TTL."""


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "postgres"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """SQLite (one file shared by both daemons) and PostgreSQL."""
    found: Engine
    if request.param == "postgres":
        found = PostgresEngine(request.getfixturevalue("postgres_server"))
    else:
        found = SqliteEngine(tmp_path / "shared.db")
    await found.connect()
    yield found
    await found.close()


async def insert_rows(engine: Engine, table: str, ids: range) -> None:
    await engine.executemany(
        f"INSERT INTO {table} (id, note) VALUES ({engine.marks(2)})", [(i, f"row {i}") for i in ids]
    )


class WatermarkLog:
    """Every value the source's watermark key takes, read from a KV watch."""

    def __init__(self, nc: NatsClient, key: str) -> None:
        self.nc = nc
        self.key = key
        self.values: list[tuple[int, list[Any]]] = []

    async def run(self, *, task_status: Any) -> None:
        bucket = await state_bucket(self.nc.jetstream(), "busway_state")
        watcher = await bucket.watch(self.key)
        task_status.started()
        async for entry in watcher:
            if entry is not None and entry.value:
                document = orjson.loads(entry.value)
                if isinstance(document, list):  # written unfenced (before the lease)
                    document = {"fence": 0, "watermark": document}
                self.values.append((document["fence"], document["watermark"]))

    def assert_monotonic(self) -> None:
        assert self.values, "no watermark was stored"
        fences = [fence for fence, _ in self.values]
        marks = [int(pairs[0][1]) for _, pairs in self.values]
        assert fences == sorted(fences), f"a stale holder wrote the watermark: {fences}"
        assert marks == sorted(marks), f"the watermark went back: {marks}"

    @property
    def last(self) -> int:
        return int(self.values[-1][1][0][1]) if self.values else 0


async def watch(tg: TaskGroup, log: WatermarkLog) -> None:
    await tg.start(log.run)


async def test_two_buses_on_one_incremental_source_publish_each_row_once(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table, stream, total = f"feed_{unique}", f"FEED_{unique}", 600
    await engine.execute(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, note TEXT)")
    source = source_table(
        engine, f"feed{unique}", table=f'"{table}"', subject=f'"feed{unique}.rows"',
        batch_size="25", interval='"20ms"', lease_ttl=f'"{TTL}s"',
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, stream, f"feed{unique}.>", source), tmp_path
    )
    log = WatermarkLog(nc, f"feed{unique}.watermark")
    async with anyio.create_task_group() as tg:
        await watch(tg, log)
        async with Bus(config) as first, Bus(config) as second:
            for start in range(1, total + 1, 100):  # rows keep arriving while both run
                await insert_rows(engine, table, range(start, start + 100))

                async def caught_up(upto: int = start + 99) -> bool:
                    return log.last == upto

                await eventually(caught_up)
            published = [bus.metrics.stats[0].published for bus in (first, second)]
        tg.cancel_scope.cancel()
    # Every PubAck counts, duplicates too: a row polled by both daemons would count twice.
    assert sum(published) == total, published
    assert 0 in published, f"both daemons polled: {published}"
    ids = [message_id(m) for m in await stream_messages(nc, stream)]
    assert ids == [f"feed{unique}:{table}:{i}" for i in range(1, total + 1)]
    log.assert_monotonic()


async def lease_holder_pid(nc: NatsClient, source: str) -> int | None:
    """The pid in the holder name of `source`'s lease, or None while nobody holds it."""
    bucket = await nc.jetstream().key_value("busway_state")
    try:
        entry = await bucket.get(f"=lease.{source}")
    except Exception:  # absent or deleted: free
        return None
    return int(orjson.loads(entry.value or b"{}")["holder"].split(":")[1])


@pytest.mark.slow
async def test_sigkill_of_the_polling_daemon_hands_over_within_the_lease_bound(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table, stream, name, total = f"kill_{unique}", f"KILL_{unique}", f"kill{unique}", 5_000
    await engine.execute(f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, note TEXT)")
    await insert_rows(engine, table, range(1, total + 1))
    source = source_table(
        engine, name, table=f'"{table}"', subject=f'"kill{unique}.rows"',
        batch_size="10", interval='"20ms"', lease_ttl=f'"{TTL}s"',
    )  # fmt: skip
    config = tmp_path / "kill.toml"
    config.write_text(bus_config(nats_server, stream, f"kill{unique}.>", source))
    daemons = [Daemon(config, log=tmp_path / f"daemon{n}.log") for n in (1, 2)]
    log = WatermarkLog(nc, f"{name}.watermark")
    try:
        async with anyio.create_task_group() as tg:
            await watch(tg, log)
            for daemon in daemons:
                daemon.start()
            for daemon in daemons:
                await daemon.ready()

            async def some_rows() -> bool:
                return log.last >= 200

            await eventually(some_rows)
            holder_pid = await lease_holder_pid(nc, name)
            [holder] = [d for d in daemons if d.process and d.process.pid == holder_pid]
            [standby] = [d for d in daemons if d is not holder]
            holder.kill()
            killed_at = time.monotonic()
            assert log.last < total, "the kill must land mid-run"

            async def taken_over() -> bool:
                pid = await lease_holder_pid(nc, name)
                return (
                    pid is not None and standby.process is not None and pid == standby.process.pid
                )

            # The bound is 1.5 * TTL; the slack is for a loaded machine, not for the design.
            await eventually(taken_over, timeout=1.5 * TTL + 10)
            print(f"\nhandover after SIGKILL: {time.monotonic() - killed_at:.2f}s (ttl {TTL}s)")

            async def all_rows() -> bool:
                return log.last == total

            await eventually(all_rows, timeout=60)
            tg.cancel_scope.cancel()
        assert await standby.stop() == 0, standby.output()
    finally:
        for daemon in daemons:
            daemon.kill()
    ids = [message_id(m) for m in await stream_messages(nc, stream)]
    assert sorted(ids) == sorted(f"{name}:{table}:{i}" for i in range(1, total + 1))
    assert len(ids) == len(set(ids)) == total
    log.assert_monotonic()
    assert "taking over" in standby.output(), "the killed holder's lease was not released"
    assert holder.process is not None and holder.process.returncode == -signal.SIGKILL
