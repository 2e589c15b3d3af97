"""MariaDB and SQLite specifics: their types as JSON, a MariaDB restart, the outbox's mark mode."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.sql.engines import MariaDBEngine, SqliteEngine
from tests.sql.helpers import bodies, bus_config, count, source_table
from tests.sql.test_sinks import sink_table
from tests.support import NatsServer, decode_test_config, eventually, wait_settled

pytestmark = pytest.mark.anyio


async def test_mariadb_types_come_out_exact_as_json(
    mariadb: MariaDBEngine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"types_{unique}"
    await mariadb.execute(
        f"""CREATE TABLE {table} (
            id BIGINT UNSIGNED PRIMARY KEY, money DECIMAL(20,6), at TIMESTAMP(6) NULL,
            local DATETIME(6), day DATE, clock TIME(3), doc JSON, bin VARBINARY(8),
            flag BOOLEAN, ratio DOUBLE, nothing TEXT)"""
    )
    await mariadb.execute(
        f"""INSERT INTO {table} VALUES (18446744073709551615, 12345678901234.123456,
            '2024-02-29 18:29:59.123456', '2024-01-01 10:00:00.5', '2024-02-29', '25:11:12.5',
            '{{"b": [1, 2.5], "a": null}}', X'00ff10', TRUE, 0.5, NULL)"""
    )
    source = source_table(
        mariadb, f"types{unique}", table=f'"{table}"', subject=f'"t{unique}.row"',
        json_columns='["doc"]',
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"T_{unique}", f"t{unique}.>", source), tmp_path
    )
    async with Bus(config):

        async def arrived() -> bool:
            return await count(nc, f"T_{unique}") == 1

        await eventually(arrived)
    assert await bodies(nc, f"T_{unique}") == [
        {
            "id": 18446744073709551615,
            "money": "12345678901234.123456",
            "at": "2024-02-29T18:29:59.123456+00:00",
            "local": "2024-01-01T10:00:00.500000+00:00",
            "day": "2024-02-29",
            "clock": "P1DT4272.5S",
            "doc": {"a": None, "b": [1, 2.5]},
            "bin": "AP8Q",
            "flag": 1,
            "ratio": 0.5,
            "nothing": None,
        }
    ]


async def test_mariadb_restart_mid_flow_loses_nothing(
    mariadb: MariaDBEngine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    copy = f"copy_{unique}"
    await mariadb.execute(f"CREATE TABLE {copy} (id BIGINT PRIMARY KEY, note TEXT NOT NULL)")
    body = sink_table(
        mariadb, f"copy{unique}", f"r{unique}.x", table=f'"{copy}"', key='["id"]',
        columns='{ id = "id", note = "note" }',
    ).replace("max_attempts = 3", "max_attempts = 1000")  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"R_{unique}", f"r{unique}.>", body), tmp_path
    )
    js = nc.jetstream()
    async with Bus(config) as bus:
        for i in range(50):
            await js.publish(f"r{unique}.x", orjson.dumps({"id": i, "note": f"n{i}"}))
        await wait_settled(nc, f"R_{unique}", f"busway-sink-copy{unique}")
        await mariadb.close()
        mariadb.server.stop(kill=True)
        for i in range(50, 100):
            await js.publish(f"r{unique}.x", orjson.dumps({"id": i, "note": f"n{i}"}))

        async def not_ready() -> bool:
            return bus.readiness()[f"sink:copy{unique}"] is False

        await eventually(not_ready)
        mariadb.server.start()
        await mariadb.connect()
        await wait_settled(nc, f"R_{unique}", f"busway-sink-copy{unique}", timeout=60)
        assert bus.readiness()[f"sink:copy{unique}"] is True
        assert bus.metrics.stats[0].dead_lettered == 0
    assert await mariadb.fetch(f"SELECT id, note FROM {copy} ORDER BY id") == [
        (i, f"n{i}") for i in range(100)
    ]


async def test_sqlite_types_and_outbox_mark_mode(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    sqlite = SqliteEngine(tmp_path / "app.db")
    await sqlite.connect()
    await sqlite.create_outbox("busway_outbox")
    await sqlite.execute(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, money TEXT, doc TEXT, blob BLOB, "
        "ratio REAL, missing TEXT)"
    )
    await sqlite.execute(
        "INSERT INTO items VALUES (1, '12345678901234.123456', '{\"a\": [1, 2]}', X'00ff10', "
        "0.5, NULL)"
    )
    await sqlite.executemany(
        "INSERT INTO busway_outbox (subject, headers, payload) VALUES (?, ?, ?)",
        [(f"s{unique}.box", None, f'{{"n": {i}}}'.encode()) for i in range(5)]
        + [("not a subject", None, b'{"n": 99}')],
    )
    body = source_table(
        sqlite, f"rows{unique}", table='"items"', subject=f'"s{unique}.row"',
        json_columns='["doc"]', path='"app.db"',
    ).replace(sqlite.config(), "") + source_table(
        sqlite, f"box{unique}", mode='"outbox"', subject='"{subject}"', on_publish='"mark"',
        interval='"50ms"', path='"app.db"',
    ).replace(sqlite.config(), "")  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"S_{unique}", f"s{unique}.>", body), tmp_path
    )
    async with Bus(config) as bus:

        async def arrived() -> bool:
            return await count(nc, f"S_{unique}") == 6

        await eventually(arrived)

        async def marked() -> bool:
            rows = await sqlite.fetch(
                "SELECT count(*) FROM busway_outbox WHERE published_at IS NOT NULL"
            )
            return rows == [(6,)]

        await eventually(marked)
        assert bus.metrics.stats[1].dead_lettered == 1  # the row with an invalid subject
    found = await bodies(nc, f"S_{unique}")
    rows = [body for body in found if "id" in body]
    assert rows == [
        {
            "id": 1,
            "money": "12345678901234.123456",
            "doc": {"a": [1, 2]},
            "blob": "AP8Q",
            "ratio": 0.5,
            "missing": None,
        }
    ]
    assert sorted(body["n"] for body in found if "n" in body) == [0, 1, 2, 3, 4]
    await sqlite.close()
