"""Database sinks on every engine: batched upserts, a refused row dead-lettered alone.

Each test runs against PostgreSQL, MariaDB and SQLite (the `engine` fixture).
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.sql.engines import Engine
from tests.sql.helpers import bus_config
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled

pytestmark = pytest.mark.anyio


def sink_table(engine: Engine, name: str, source: str, **keys: str) -> str:
    lines = "\n".join(f"{key} = {value}" for key, value in keys.items())
    return f"""
[[sinks]]
name = "{name}"
type = "{engine.type}"
from = "{source}"
{engine.config()}
batch_size = 64
batch_wait = "50ms"
retry = {{ max_attempts = 3, backoff = "50ms", max_backoff = "100ms" }}
{lines}
"""


async def create_orders(engine: Engine, table: str) -> None:
    await engine.execute(
        f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name VARCHAR(100) NOT NULL, "
        f"amount {engine.decimal})"
    )


def order(i: int, version: int) -> bytes:
    document: dict[str, object] = {
        "order": {"id": i},
        "name": f"n{i}v{version}",
        "amount": f"{i}.25",
    }
    if i == 17:
        del document["name"]  # NOT NULL refuses this one row
    return orjson.dumps(document)


async def dead_letters(nc: NatsClient, sink: str) -> list[dict[str, object]]:
    return [
        {"body": orjson.loads(m.data), "error": (m.headers or {}).get("Busway-Error", "")}
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.{sink}"
    ]


async def test_upsert_sink_dead_letters_only_the_refused_row_and_redelivery_adds_no_row(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"orders_{unique}"
    sink = f"db{unique}"
    await create_orders(engine, table)
    body = sink_table(
        engine, sink, f"in{unique}.orders", table=f'"{table}"', key='["id"]',
        columns='{ id = "order.id", name = "name", amount = "amount" }',
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"IN_{unique}", f"in{unique}.>", body), tmp_path
    )
    js = nc.jetstream()
    async with Bus(config) as bus:
        for version in (1, 2):  # the second round is a redelivery of every order, changed
            for i in range(40):
                await js.publish(f"in{unique}.orders", order(i, version))
            await wait_settled(nc, f"IN_{unique}", f"busway-sink-{sink}")
        stats = bus.metrics.stats[0]
        assert (stats.published, stats.dead_lettered) == (78, 2)
        assert bus.readiness()[f"sink:{sink}"] is True

    rows = await engine.fetch(f"SELECT id, name, amount FROM {table} ORDER BY id")
    assert [(i, name, Decimal(str(amount))) for i, name, amount in rows] == [
        (i, f"n{i}v2", Decimal(f"{i}.25")) for i in range(40) if i != 17
    ]
    dead = await dead_letters(nc, sink)
    assert [d["body"] for d in dead] == [orjson.loads(order(17, 1)), orjson.loads(order(17, 2))]
    assert all("name" in str(d["error"]).lower() for d in dead), dead


async def test_statement_sink_binds_parameters_from_expressions(
    engine: Engine, nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    table = f"events_{unique}"
    sink = f"st{unique}"
    await engine.execute(
        f"CREATE TABLE {table} (seq BIGINT PRIMARY KEY, subject VARCHAR(200), note TEXT)"
    )
    marks = {"postgres": "$1, $2, $3", "mysql": "%s, %s, %s", "sqlite": "?, ?, ?"}[engine.type]
    statement = f"INSERT INTO {table} (seq, subject, note) VALUES ({marks})"
    body = sink_table(
        engine, sink, f"ev{unique}.>", statement=f'"{statement}"',
        params="[\"meta('seq')\", \"subject()\", \"note\"]",
    )  # fmt: skip
    config = decode_test_config(
        bus_config(nats_server, f"EV_{unique}", f"ev{unique}.>", body), tmp_path
    )
    js = nc.jetstream()
    async with Bus(config):
        for i in range(5):
            await js.publish(f"ev{unique}.n{i}", orjson.dumps({"note": f"it's 100% #{i}"}))
        await wait_settled(nc, f"EV_{unique}", f"busway-sink-{sink}")
    assert await engine.fetch(f"SELECT seq, subject, note FROM {table} ORDER BY seq") == [
        (i + 1, f"ev{unique}.n{i}", f"it's 100% #{i}") for i in range(5)
    ]
