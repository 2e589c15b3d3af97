"""A database source's message ids name the source, so two of them never collide in a stream.

Two databases often have tables of the same name (an outbox per service, `busway_outbox` by
default) with the same ids. Published into one stream with ids of `<table>:<id>`, the second
source's rows were taken for copies of the first one's and dropped by the stream's duplicate
window, and an outbox then deleted them: data loss. Each test runs two sources of one engine
(PostgreSQL, MariaDB or SQLite, the `engine` fixture) on two databases.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.sql.engines import Engine
from tests.sql.helpers import bus_config, count, messages, source_table, watermark_of
from tests.support import NatsServer, decode_test_config, eventually

pytestmark = pytest.mark.anyio

ROWS = 120


@pytest.fixture
async def other(engine: Engine, unique: str) -> AsyncIterator[Engine]:
    """The same engine on a second database."""
    found = await engine.another_database(f"second_{unique}")
    await found.connect()
    yield found
    await found.close()


async def fill_outbox(engine: Engine, table: str, subject: str, database: str) -> None:
    await engine.create_outbox(table)
    await engine.executemany(
        f"INSERT INTO {table} (subject, headers, payload) VALUES ({engine.marks(3)})",
        [(subject, None, orjson.dumps({"db": database, "n": n}).decode()) for n in range(ROWS)],
    )


async def test_two_outboxes_with_the_same_table_name_into_one_stream_lose_no_row(
    engine: Engine,
    other: Engine,
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
) -> None:
    table = f"outbox_{unique}"  # the same name in both databases, ids 1..ROWS in both
    stream = f"BOX_{unique}"
    await fill_outbox(engine, table, f"box{unique}.orders", "first")
    await fill_outbox(other, table, f"box{unique}.orders", "second")
    sources = "".join(
        source_table(
            database,
            f"{name}{unique}",
            mode='"outbox"',
            table=f'"{table}"',
            subject='"{subject}"',
            batch_size="25",
            interval='"50ms"',
        )
        for name, database in (("first", engine), ("second", other))
    )
    config = decode_test_config(
        bus_config(nats_server, stream, f"box{unique}.>", sources), tmp_path
    )
    async with Bus(config):

        async def both_drained() -> bool:
            for database in (engine, other):
                if await database.fetch(f"SELECT id FROM {table}"):
                    return False
            return True

        await eventually(both_drained)

    found = await messages(nc, stream)
    rows = sorted((body["db"], body["n"]) for body in map(orjson.loads, (m.data for m in found)))
    assert rows == sorted((db, n) for db in ("first", "second") for n in range(ROWS))
    ids = {m.headers["Nats-Msg-Id"] for m in found if m.headers}
    assert {i.split(":")[0] for i in ids} == {f"first{unique}", f"second{unique}"}
    assert len(ids) == 2 * ROWS


async def test_two_incremental_sources_of_same_named_tables_into_one_stream_lose_no_row(
    engine: Engine,
    other: Engine,
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
) -> None:
    table = f"items_{unique}"
    stream = f"ITEMS_{unique}"
    for database in (engine, other):
        await database.execute(
            f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL)"
        )
        await database.executemany(
            f"INSERT INTO {table} (id, name) VALUES ({database.marks(2)})",
            [(i, f"{database.type} {i}") for i in range(1, ROWS + 1)],
        )
    sources = "".join(
        source_table(
            database,
            f"{name}{unique}",
            table=f'"{table}"',
            subject=f'"items{unique}.rows"',
            batch_size="50",
            interval='"50ms"',
        )
        for name, database in (("first", engine), ("second", other))
    )
    config = decode_test_config(
        bus_config(nats_server, stream, f"items{unique}.>", sources), tmp_path
    )
    async with Bus(config):
        state = await nc.jetstream().key_value("busway_state")

        async def both_read() -> bool:
            for name in ("first", "second"):
                try:
                    entry = await state.get(f"{name}{unique}.watermark")
                except Exception:  # not stored yet
                    return False
                if watermark_of(entry.value) != f'[["int","{ROWS}"]]'.encode():
                    return False
            return True

        await eventually(both_read)

    assert await count(nc, stream) == 2 * ROWS
    ids = sorted(m.headers["Nats-Msg-Id"] for m in await messages(nc, stream) if m.headers)
    assert ids == sorted(
        f"{name}{unique}:{table}:{i}" for name in ("first", "second") for i in range(1, ROWS + 1)
    )
