"""PostgreSQL specifics: exact types, LISTEN/NOTIFY wake-ups, a database restart mid-flow."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.sql.engines import PostgresEngine
from tests.sql.helpers import bodies, bus_config, count, source_table
from tests.sql.test_sinks import sink_table
from tests.support import NatsServer, decode_test_config, eventually, wait_settled

pytestmark = pytest.mark.anyio


async def test_types_come_out_exact_as_json(
    postgres: PostgresEngine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"types_{unique}"
    await postgres.execute(
        f"""CREATE TABLE {table} (
            id bigint PRIMARY KEY, money numeric(20,6), at timestamptz, local timestamp,
            day date, clock time, span interval, doc jsonb, raw json, blob bytea, ref uuid,
            flag boolean, ratio double precision, nothing text)"""
    )
    await postgres.execute(
        f"""INSERT INTO {table} VALUES (1, 12345678901234.123456,
            '2024-02-29 23:59:59.123456+05:30', '2024-01-01 10:00:00.5', '2024-02-29',
            '10:11:12.5', '1 day 01:00:00.25', '{{"b": [1, 2.50], "a": null}}',
            '{{"keep":  "spacing", "n": 1.10}}', '\\x00ff10',
            'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', true, 0.5, NULL)"""
    )
    source = source_table(
        postgres, f"types{unique}", table=f'"{table}"', subject=f'"t{unique}.row"'
    )
    config = decode_test_config(
        bus_config(nats_server, f"T_{unique}", f"t{unique}.>", source), tmp_path
    )
    async with Bus(config):

        async def arrived() -> bool:
            return await count(nc, f"T_{unique}") == 1

        await eventually(arrived)
    [message] = await bodies(nc, f"T_{unique}")
    assert message == {
        "id": 1,
        "money": "12345678901234.123456",
        "at": "2024-02-29T18:29:59.123456+00:00",
        "local": "2024-01-01T10:00:00.500000+00:00",
        "day": "2024-02-29",
        "clock": "10:11:12.500000",
        "span": "P1DT3600.25S",
        "doc": {"a": None, "b": [1, 2.50]},
        "raw": {"keep": "spacing", "n": 1.10},
        "blob": "AP8Q",
        "ref": "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
        "flag": True,
        "ratio": 0.5,
        "nothing": None,
    }


async def test_sink_writes_numeric_and_timestamptz_exactly(
    postgres: PostgresEngine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"money_{unique}"
    await postgres.execute(
        f"CREATE TABLE {table} "
        "(id bigint PRIMARY KEY, total numeric(20,6), at timestamptz, doc jsonb)"
    )
    body = sink_table(
        postgres, f"m{unique}", f"m{unique}.in", table=f'"{table}"', key='["id"]',
        columns='{ id = "id", total = "total", at = "at", doc = "doc" }',
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"M_{unique}", f"m{unique}.>", body), tmp_path
    )
    async with Bus(config):
        await nc.jetstream().publish(
            f"m{unique}.in",
            b'{"id": 1, "total": "99999999999999.999999", "at": "2024-02-29T23:59:59.999999+05:30",'
            b' "doc": {"x": [1, "two"]}}',
        )
        await wait_settled(nc, f"M_{unique}", f"busway-sink-m{unique}")
    rows = await postgres.fetch(
        "SELECT total::text, to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US'), "
        f"doc::text FROM {table}"
    )
    assert rows == [("99999999999999.999999", "2024-02-29 18:29:59.999999", '{"x": [1, "two"]}')]


async def test_notify_wakes_the_source_long_before_its_interval(
    postgres: PostgresEngine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"box_{unique}"
    await postgres.create_outbox(table)  # its trigger notifies channel `table`
    source = source_table(
        postgres, f"n{unique}", mode='"outbox"', table=f'"{table}"', subject='"{subject}"',
        notify_channel=f'"{table}"', interval='"1h"',
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"N_{unique}", f"n{unique}.>", source), tmp_path
    )
    async with Bus(config):
        for i in range(3):
            await postgres.execute(
                f"INSERT INTO {table} (subject, payload) VALUES (%s, %s)",
                (f"n{unique}.event", orjson.dumps({"i": i}).decode()),
            )

            async def published() -> bool:
                return await count(nc, f"N_{unique}") == i + 1  # noqa: B023

            # The interval is an hour: only the notification can make this happen.
            await eventually(published, timeout=20)
    assert await bodies(nc, f"N_{unique}") == [{"i": 0}, {"i": 1}, {"i": 2}]


@pytest.mark.slow
async def test_database_restart_mid_flow_loses_and_duplicates_nothing(
    postgres: PostgresEngine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Source and sink ride out `pg_ctl stop -m immediate` (a crash) and a restart."""
    feed, copy = f"feed_{unique}", f"copy_{unique}"
    await postgres.execute(f"CREATE TABLE {feed} (id bigint PRIMARY KEY, note text NOT NULL)")
    await postgres.execute(f"CREATE TABLE {copy} (id bigint PRIMARY KEY, note text NOT NULL)")
    insert = f"INSERT INTO {feed} (id, note) VALUES (%s, %s)"
    await postgres.executemany(insert, [(i, f"note {i}") for i in range(1, 201)])
    body = source_table(
        postgres, f"feed{unique}", table=f'"{feed}"', subject=f'"r{unique}.feed"',
        batch_size="50", interval='"100ms"',
    ) + sink_table(
        postgres, f"copy{unique}", f"r{unique}.feed", table=f'"{copy}"', key='["id"]',
        columns='{ id = "id", note = "note" }',
    ).replace("max_attempts = 3", "max_attempts = 1000")  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"R_{unique}", f"r{unique}.>", body), tmp_path
    )
    async with Bus(config) as bus:
        await wait_settled(nc, f"R_{unique}", f"busway-sink-copy{unique}")
        postgres.server.stop("immediate")
        await postgres.close()
        # While the database is down, messages for the sink wait in the stream.
        js = nc.jetstream()
        for i in range(201, 231):
            await js.publish(f"r{unique}.feed", orjson.dumps({"id": i, "note": f"note {i}"}))

        async def sink_not_ready() -> bool:
            return bus.readiness()[f"sink:copy{unique}"] is False

        await eventually(sink_not_ready)
        postgres.server.start()
        await postgres.executemany(insert, [(i, f"note {i}") for i in range(231, 301)])

        async def all_copied() -> bool:
            rows = await postgres.fetch(f"SELECT count(*) FROM {copy}")
            return rows == [(300,)]

        await eventually(all_copied, timeout=60)
        await wait_settled(nc, f"R_{unique}", f"busway-sink-copy{unique}")
        assert bus.readiness()[f"sink:copy{unique}"] is True
    ids = [body["id"] for body in await bodies(nc, f"R_{unique}")]
    assert sorted(ids) == list(range(1, 301))  # each row exactly once in the stream
    assert await postgres.fetch(f"SELECT id, note FROM {copy} ORDER BY id") == [
        (i, f"note {i}") for i in range(1, 301)
    ]
