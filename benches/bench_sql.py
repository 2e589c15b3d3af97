"""Database throughput: busway's postgres sink and source vs raw driver loops, same run.

Into PostgreSQL (`sink`): N JSON orders preloaded in a stream are upserted into a table
  * busway: a `postgres` sink (batch_size 1000, the default batch_wait of 5 ms, columns
            mapped by JMESPath, upsert on id);
  * raw:    psycopg `executemany` of the same rows, 1000 per transaction (no NATS at all).
Out of PostgreSQL (`source`): N table rows become messages
  * busway: an incremental `postgres` source (batch_size 1000, watermark in JetStream KV);
  * raw:    keyset-paged SELECT of 1000 rows + `js.publish_async` per row, awaiting the
            PubAcks of each page before the next (the same at-least-once contract).

Each figure is rows per second, median of `--rounds`; the ratio is busway / raw. PostgreSQL runs
with fsync on; nats-server with `sync_interval: always` (`--sync always`, busway's embedded
default) or its default (`--sync default`: flushed every 2 minutes).

    python benches/bench_sql.py                     # 50k rows, sync always, 3 rounds
    python benches/bench_sql.py --sync default
    python benches/bench_sql.py drivers             # the driver comparison (needs asyncpg,
                                                    # aiomysql installed besides psycopg, asyncmy)
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import nats
import orjson
import psycopg

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from busway import Bus, default_registry  # noqa: E402
from busway._config.model import decode_config  # noqa: E402
from tests.sql.servers import MariaDBServer, PostgresServer  # noqa: E402
from tests.support import NatsServer  # noqa: E402

BATCH = 1000
UPSERT = (
    "INSERT INTO {table} (id, customer, total, paid_at) VALUES (%s, %s, %s, %s) "
    "ON CONFLICT (id) DO UPDATE SET customer = excluded.customer, total = excluded.total, "
    "paid_at = excluded.paid_at"
)


def order(i: int) -> dict[str, Any]:
    return {
        "id": i,
        "customer": {"name": f"customer {i % 977}", "tier": "gold"},
        "total": f"{i % 100000}.{i % 100:02d}",
        "paid_at": "2024-05-01T10:00:00.123456+02:00",
        "lines": [{"sku": "A-1", "qty": 2}],
    }


def config(nats_url: str, dsn: str, body: str, *, top: str = "") -> Any:
    """A decoded config: `top` holds top-level keys, `body` the [[sources]]/[[sinks]] tables."""
    registry = default_registry()
    text = f"""{top}
[nats]
servers = ["{nats_url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "BENCH"
subjects = ["bench.>"]
duplicate_window = "10m"
{body.replace("DSN", dsn)}
"""
    return decode_config(text, source_types=registry.source_config, sink_types=registry.sink_config)


async def poll_until(check: Callable[[], Awaitable[bool]]) -> None:
    """Return once `check` is true, checking every 20 ms."""
    while True:
        if await check():
            return
        await anyio.sleep(0.02)


async def create_orders(dsn: str, table: str) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute(f"DROP TABLE IF EXISTS {table}")
        await connection.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, customer text NOT NULL, "
            "total numeric(20,6), paid_at timestamptz)"
        )


async def table_count(dsn: str, table: str) -> int:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        row = await (await connection.execute(f"SELECT count(*) FROM {table}")).fetchone()
        return int(row[0]) if row else 0


async def reset_stream(nc: nats.NATS, count: int) -> None:
    js = nc.jetstream(publish_async_max_pending=4096)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream("BENCH")
    await js.add_stream(name="BENCH", subjects=["bench.>"], duplicate_window=600)
    if count:
        for i in range(count):
            await js.publish_async("bench.orders", orjson.dumps(order(i)))
        await js.publish_async_completed()


async def sink_busway(nc: nats.NATS, url: str, dsn: str, count: int) -> float:
    await create_orders(dsn, "bench_sink")
    await reset_stream(nc, count)
    body = f"""
[[sinks]]
name = "bench-sink"
type = "postgres"
from = "bench.orders"
dsn = "DSN"
table = "bench_sink"
columns = {{ id = "id", customer = "customer.name", total = "total", paid_at = "paid_at" }}
key = ["id"]
batch_size = {BATCH}
max_in_flight = {4 * BATCH}
"""
    async with Bus(config(url, dsn, body)):
        started = time.perf_counter()

        async def written() -> bool:
            return await table_count(dsn, "bench_sink") >= count

        await poll_until(written)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def sink_raw(dsn: str, count: int) -> float:
    await create_orders(dsn, "bench_sink")
    documents = [orjson.dumps(order(i)) for i in range(count)]
    started = time.perf_counter()
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        for start in range(0, count, BATCH):
            rows = []
            for data in documents[start : start + BATCH]:
                doc = orjson.loads(data)
                rows.append((doc["id"], doc["customer"]["name"], doc["total"], doc["paid_at"]))
            async with connection.transaction(), connection.cursor() as cursor:
                await cursor.executemany(UPSERT.format(table="bench_sink"), rows)
    return count / (time.perf_counter() - started)


async def fill_source_table(dsn: str, count: int) -> None:
    await create_orders(dsn, "bench_source")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        await connection.execute(
            "INSERT INTO bench_source SELECT i, 'customer ' || (i % 977), (i % 100000) + 0.25,"
            f" now() FROM generate_series(1, {count}) AS i"
        )


async def source_busway(nc: nats.NATS, url: str, dsn: str, count: int, state: str) -> float:
    await reset_stream(nc, 0)
    js = nc.jetstream()
    body = f"""
[[sources]]
name = "bench-source"
type = "postgres"
dsn = "DSN"
table = "bench_source"
subject = "bench.rows"
batch_size = {BATCH}
interval = "50ms"
"""
    # A fresh state bucket per round, so every round reads the table from the start.
    decoded = config(url, dsn, body, top=f'state_bucket = "{state}"')
    started = time.perf_counter()
    async with Bus(decoded):

        async def published() -> bool:
            return (await js.stream_info("BENCH")).state.messages >= count

        await poll_until(published)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def source_raw(nc: nats.NATS, dsn: str, count: int) -> float:
    await reset_stream(nc, 0)
    js = nc.jetstream(publish_async_max_pending=1024)
    started = time.perf_counter()
    last = 0
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as connection:
        while True:
            cursor = await connection.execute(
                "SELECT * FROM bench_source WHERE id > %s ORDER BY id LIMIT %s", (last, BATCH)
            )
            columns = [c.name for c in cursor.description or ()]
            rows = await cursor.fetchall()
            if not rows:
                break
            futures = []
            for row in rows:
                data = orjson.dumps(dict(zip(columns, row, strict=True)), default=str)
                futures.append(
                    await js.publish_async(
                        "bench.rows", data, headers={"Nats-Msg-Id": f"raw:{row[0]}"}
                    )
                )
            for future in futures:
                await future
            last = rows[-1][0]
    return count / (time.perf_counter() - started)


async def run(args: argparse.Namespace) -> None:
    store = Path(tempfile.mkdtemp(prefix="busway-bench-sql-"))
    server = NatsServer(store, sync_always=args.sync == "always")
    postgres = PostgresServer(fsync=True)
    try:
        nc = await nats.connect(server.url)
        await fill_source_table(postgres.dsn, args.count)
        results: dict[str, list[float]] = {k: [] for k in ("sink", "sink_raw", "src", "src_raw")}
        for round_ in range(args.rounds):
            results["sink_raw"].append(await sink_raw(postgres.dsn, args.count))
            results["sink"].append(await sink_busway(nc, server.url, postgres.dsn, args.count))
            results["src_raw"].append(await source_raw(nc, postgres.dsn, args.count))
            results["src"].append(
                await source_busway(
                    nc, server.url, postgres.dsn, args.count, f"bench_state_{round_}"
                )
            )
        await nc.close()
    finally:
        postgres.close()
        server.stop()
    median = {key: statistics.median(values) for key, values in results.items()}
    print(
        f"PostgreSQL 15 (fsync on), nats-server sync={args.sync}, {args.count} rows, "
        f"batch {BATCH}, median of {args.rounds}"
    )
    print(
        f"into PostgreSQL: busway sink {median['sink']:,.0f} rows/s, raw executemany "
        f"{median['sink_raw']:,.0f} rows/s, ratio {median['sink'] / median['sink_raw']:.2f}"
    )
    print(
        f"out of PostgreSQL: busway source {median['src']:,.0f} rows/s, raw SELECT+publish "
        f"{median['src_raw']:,.0f} rows/s, ratio {median['src'] / median['src_raw']:.2f}"
    )


async def drivers(count: int, rounds: int = 7) -> None:
    """asyncpg vs psycopg 3, asyncmy vs aiomysql: a 10k-row upsert batch and a 10k-row SELECT.

    The contenders run in turns within each round, so a busy machine slows them alike; each
    figure is the median over `rounds`. PostgreSQL runs with fsync on.
    """
    import datetime
    import decimal

    import aiomysql
    import asyncmy
    import asyncpg

    base = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    data = [
        (
            i,
            f"name {i}",
            decimal.Decimal(f"{i}.123456"),
            base + datetime.timedelta(seconds=i),
            orjson.dumps({"i": i, "tags": ["a", "b"]}).decode(),
        )
        for i in range(count)
    ]
    # What a sink holds after JMESPath: JSON values, i.e. strings for amounts and times.
    text_data = [(str(i), n, str(m), t.isoformat(), d) for i, n, m, t, d in data]

    async def in_turns(actions: dict[str, Callable[[], Awaitable[Any]]]) -> None:
        timings: dict[str, list[float]] = {label: [] for label in actions}
        for _ in range(rounds):
            for label, action in actions.items():
                started = time.perf_counter()
                await action()
                timings[label].append(time.perf_counter() - started)
        for label, values in timings.items():
            print(f"{label:48} {count / statistics.median(values):>10,.0f} rows/s")

    columns = "(id bigint PRIMARY KEY, name text, amount numeric(20,6), ts timestamptz, doc jsonb)"
    upsert = (
        "INSERT INTO {table} (id, name, amount, ts, doc) VALUES ($1, $2, $3, $4, $5) "
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, amount = excluded.amount, "
        "ts = excluded.ts, doc = excluded.doc"
    )
    cast = upsert.replace("$1,", "$1::text::bigint,").replace("$3,", "$3::text::numeric,")
    cast = cast.replace("$4,", "$4::text::timestamptz,")
    postgres = PostgresServer(fsync=True)
    try:
        a = await asyncpg.connect(postgres.dsn)
        p = await psycopg.AsyncConnection.connect(postgres.dsn, autocommit=True)
        for table in ("t_asyncpg", "t_psycopg"):
            await a.execute(f"CREATE TABLE {table} {columns}")

        async def asyncpg_upsert(sql: str, rows: list[tuple[Any, ...]]) -> None:
            async with a.transaction():
                await a.executemany(sql.format(table="t_asyncpg"), rows)

        async def psycopg_upsert(rows: list[tuple[Any, ...]]) -> None:
            async with p.transaction(), psycopg.AsyncRawCursor(p) as cursor:
                await cursor.executemany(upsert.format(table="t_psycopg"), rows)

        async def psycopg_select() -> None:
            await (await p.execute("SELECT * FROM t_psycopg")).fetchall()

        await in_turns(
            {
                "asyncpg 0.32 upsert (Python types)": lambda: asyncpg_upsert(upsert, data),
                "asyncpg 0.32 upsert (text + ::type casts)": lambda: asyncpg_upsert(
                    cast, text_data
                ),
                "psycopg 3.3 upsert (Python types)": lambda: psycopg_upsert(data),
                "psycopg 3.3 upsert (text of unknown type)": lambda: psycopg_upsert(text_data),
                "asyncpg 0.32 select": lambda: a.fetch("SELECT * FROM t_asyncpg"),
                "psycopg 3.3 select": psycopg_select,
            }
        )
        await a.close()
        await p.close()
    finally:
        postgres.close()
    mariadb = MariaDBServer()
    try:
        mariadb.create_database("busway")
        my_upsert = (
            "INSERT INTO {table} (id, name, amount, ts, doc) VALUES (%s, %s, %s, %s, %s) "
            "ON DUPLICATE KEY UPDATE name = VALUES(name), amount = VALUES(amount), "
            "ts = VALUES(ts), doc = VALUES(doc)"
        )
        naive = [(i, n, m, t.replace(tzinfo=None), d) for i, n, m, t, d in data]
        actions: dict[str, Callable[[], Awaitable[Any]]] = {}
        selects: dict[str, Callable[[], Awaitable[Any]]] = {}
        connections = []
        for name, module in (("asyncmy", asyncmy), ("aiomysql", aiomysql)):
            connection = await module.connect(
                host="127.0.0.1", port=mariadb.port, user="root", db="busway"
            )
            connections.append(connection)
            table = f"t_{name}"
            async with connection.cursor() as cursor:
                await cursor.execute(
                    f"CREATE TABLE {table} (id BIGINT PRIMARY KEY, name TEXT, "
                    "amount DECIMAL(20,6), ts DATETIME(6), doc JSON)"
                )

            async def write(connection: Any = connection, table: str = table) -> None:
                async with connection.cursor() as cursor:
                    await cursor.executemany(my_upsert.format(table=table), naive)
                await connection.commit()

            async def select(connection: Any = connection, table: str = table) -> None:
                async with connection.cursor() as cursor:
                    await cursor.execute(f"SELECT * FROM {table}")
                    await cursor.fetchall()
                await connection.commit()

            actions[f"{name} upsert"] = write
            selects[f"{name} select"] = select
        await in_turns({**actions, **selects})
        for connection in connections:
            connection.close()
    finally:
        mariadb.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", nargs="?", choices=["bench", "drivers"], default="bench")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync", choices=["always", "default"], default="always")
    args = parser.parse_args()
    if args.mode == "drivers":
        anyio.run(drivers, 10_000)
    else:
        anyio.run(run, args, backend_options={"use_uvloop": True})


if __name__ == "__main__":
    main()
