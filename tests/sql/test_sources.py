"""Database sources on every engine: new rows and outbox rows become messages exactly once.

Each test runs against PostgreSQL, MariaDB and SQLite (the `engine` fixture).
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, StreamConfig

from busway import Bus
from tests.sql.engines import Engine
from tests.sql.helpers import bodies, bus_config, count, messages, source_table, watermark_of
from tests.support import NatsServer, decode_test_config, eventually

pytestmark = pytest.mark.anyio


async def create_items(engine: Engine, table: str) -> None:
    await engine.execute(
        f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL, "
        f"amount {engine.decimal})"
    )


async def insert_items(engine: Engine, table: str, ids: range) -> None:
    await engine.executemany(
        f"INSERT INTO {table} (id, name, amount) VALUES ({engine.marks(3)})",
        [(i, f"item {i}", f"{i}.500000") for i in ids],
    )


async def test_incremental_source_publishes_new_rows_once_in_watermark_order(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"items_{unique}"
    await create_items(engine, table)
    await insert_items(engine, table, range(1, 26))
    source = source_table(
        engine, f"src{unique}", table=f'"{table}"', subject=f'"rows{unique}.items"',
        batch_size="10", interval='"50ms"',
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"ROWS_{unique}", f"rows{unique}.>", source), tmp_path
    )
    stream = f"ROWS_{unique}"
    async with Bus(config) as bus:

        async def first_rows() -> bool:
            return await count(nc, stream) == 25

        await eventually(first_rows)
        await insert_items(engine, table, range(26, 31))

        async def later_rows() -> bool:
            return await count(nc, stream) == 30

        await eventually(later_rows)
        stats = bus.metrics.stats[0]
        assert (stats.published, stats.dead_lettered) == (30, 0)

    found = await messages(nc, stream)
    assert [orjson.loads(m.data) for m in found] == [
        {"id": i, "name": f"item {i}", "amount": f"{i}.500000"} for i in range(1, 31)
    ]
    assert [m.headers and m.headers["Nats-Msg-Id"] for m in found] == [
        f"src{unique}:{table}:{i}" for i in range(1, 31)
    ]
    watermark = await nc.jetstream().key_value("busway_state")
    stored = (await watermark.get(f"src{unique}.watermark")).value
    assert watermark_of(stored) == b'[["int","30"]]'


async def test_watermark_advances_only_after_the_rows_pubacks(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """A stream that refuses rows 11+ must not move the watermark past row 10."""
    table = f"items_{unique}"
    stream = f"FULL_{unique}"
    await create_items(engine, table)
    await insert_items(engine, table, range(1, 36))
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=stream, subjects=[f"full{unique}.>"], max_msgs=10,
            discard=DiscardPolicy.NEW, duplicate_window=600,
        )
    )  # fmt: skip
    source = source_table(
        engine, f"src{unique}", table=f'"{table}"', subject=f'"full{unique}.items"',
        batch_size="10", interval='"50ms"',
    )  # fmt: skip
    # nats-py leaves the PubAck future of a refused publish unresolved (APIError.from_error
    # raises in its reply handler), so a refusal surfaces as a publish timeout: keep it short.
    text = (
        bus_config(nats_server, stream, f"full{unique}.>", source)
        .replace('duplicate_window = "10m"', "create = false")
        .replace("[http]", 'publish_timeout = "1s"\n\n[http]')
    )
    config = decode_test_config(text, tmp_path)
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]

        async def refused() -> bool:
            return stats.errors.get("retryable", 0) >= 1

        await eventually(refused)
        state = await js.key_value("busway_state")
        stored = (await state.get(f"src{unique}.watermark")).value
        assert watermark_of(stored) == b'[["int","10"]]'
        assert await count(nc, stream) == 10
        await js.update_stream(
            StreamConfig(
                name=stream, subjects=[f"full{unique}.>"], max_msgs=-1,
                discard=DiscardPolicy.NEW, duplicate_window=600,
            )
        )  # fmt: skip

        async def all_rows() -> bool:
            return await count(nc, stream) == 35

        await eventually(all_rows)

        async def advanced() -> bool:
            entry = await state.get(f"src{unique}.watermark")
            return watermark_of(entry.value) == b'[["int","35"]]'

        await eventually(advanced)
    assert [body["id"] for body in await bodies(nc, stream)] == list(range(1, 36))


async def test_two_buses_share_one_outbox_without_publishing_a_row_twice(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"outbox_{unique}"
    stream = f"OUT_{unique}"
    total = 300
    await engine.create_outbox(table)
    await engine.executemany(
        f"INSERT INTO {table} (subject, headers, payload) VALUES ({engine.marks(3)})",
        [
            (f"out{unique}.n{i % 3}", orjson.dumps({"Row": str(i)}).decode(), f'{{"n": {i}}}')
            for i in range(total)
        ],
    )
    source = source_table(
        engine, f"box{unique}", mode='"outbox"', table=f'"{table}"', subject='"{subject}"',
        batch_size="20", interval='"50ms"',
    )  # fmt: skip
    config = decode_test_config(bus_config(nats_server, stream, f"out{unique}.>", source), tmp_path)
    async with Bus(config) as first, Bus(config) as second:

        async def drained() -> bool:
            return await count(nc, stream) == total and not await engine.fetch(
                f"SELECT id FROM {table}"
            )

        await eventually(drained)
        published = [bus.metrics.stats[0].published for bus in (first, second)]
    # Every PubAck counts, duplicates too: a row published by both would make the sum exceed.
    assert sum(published) == total
    found = await messages(nc, stream)
    assert sorted(orjson.loads(m.data)["n"] for m in found) == list(range(total))
    for m in found:
        n = orjson.loads(m.data)["n"]
        assert m.subject == f"out{unique}.n{n % 3}"
        assert m.headers and m.headers["Row"] == str(n)
        assert m.headers["Nats-Msg-Id"].startswith(f"box{unique}:{table}:")
