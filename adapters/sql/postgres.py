"""The `postgres` source and sink, on psycopg 3 with a psycopg_pool connection pool.

    [[sources]]
    name = "orders-db"
    type = "postgres"
    dsn = "postgresql://busway:${PGPASSWORD}@db:5432/shop"
    table = "orders"
    watermark = ["updated_at", "id"]
    subject = "db.orders"
    notify_channel = "orders_changed"   # optional: a trigger's pg_notify wakes the poller

Why psycopg 3 rather than asyncpg (`benches/bench_sql.py drivers`): both upsert a 10k-row
batch of JSON-derived values at the same speed; psycopg sends text parameters with an *unknown*
type, so the server casts each JSON value to its column's type (`"2024-01-01T10:00:00+02:00"`
into a timestamptz, `"12.50"` into a numeric) where asyncpg would demand Python datetimes and
Decimals per column. asyncpg reads about twice as fast, but both read far faster than JetStream
stores, so reads never limit a source.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

import anyio
import orjson

try:
    import psycopg
    import psycopg.sql
    import psycopg_pool
    from psycopg.adapt import Buffer, Loader
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the postgres adapter needs psycopg 3 and psycopg_pool ({exc}): "
        "pip install 'busway[postgres]'"
    ) from exc

from busway import Adapter, BuildContext, Duration, RetryableError
from busway.adapters.sql._config import SqlSinkConfig, SqlSourceConfig, check_identifier
from busway.adapters.sql._database import Connection, RowError, Rows
from busway.adapters.sql._dialect import POSTGRES
from busway.adapters.sql._sink import SqlSink
from busway.adapters.sql._source import Listener, SqlSource
from busway.adapters.sql._types import JsonText

__all__ = [
    "PostgresDatabase",
    "PostgresSinkConfig",
    "PostgresSourceConfig",
    "adapter",
    "create_sink",
    "create_source",
]

logger = logging.getLogger("busway.adapters.sql.postgres")


class PostgresSourceConfig(SqlSourceConfig, tag="postgres", frozen=True, kw_only=True):
    """A PostgreSQL source: `dsn` is a libpq URL or `key=value` string."""

    dsn: str
    notify_channel: str | None = None
    pool_size: int = 2
    connect_timeout: Duration = Duration(5.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.notify_channel is not None:
            check_identifier(self.notify_channel, "notify_channel")
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")


class PostgresSinkConfig(SqlSinkConfig, tag="postgres", frozen=True, kw_only=True):
    """A PostgreSQL sink; a `statement` uses `$1`, `$2`... placeholders."""

    dsn: str
    pool_size: int = 2
    connect_timeout: Duration = Duration(5.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")


class _TextLoader(Loader):
    """numeric as its exact text: no Decimal round trip, no float anywhere."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode()


class _JsonLoader(Loader):
    """json/jsonb as the server's text, embedded into messages without re-parsing."""

    def load(self, data: Buffer) -> JsonText:
        return JsonText(bytes(data).decode())


async def _configure(connection: psycopg.AsyncConnection[Any]) -> None:
    for name in ("numeric",):
        connection.adapters.register_loader(name, _TextLoader)
    for name in ("json", "jsonb"):
        connection.adapters.register_loader(name, _JsonLoader)
    # Timestamps with time zone come out in UTC: the same instant, one spelling.
    await connection.execute("SET TIME ZONE 'UTC'")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """psycopg's exceptions as busway's (see `_database`)."""
    try:
        yield
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        raise RowError(_describe(exc)) from exc
    except psycopg_pool.PoolTimeout as exc:
        raise RetryableError(f"no PostgreSQL connection available: {exc}") from exc
    except psycopg.Error as exc:
        raise RetryableError(f"PostgreSQL: {_describe(exc)}") from exc


def _describe(exc: psycopg.Error) -> str:
    text = " ".join(str(exc).split())
    return f"{text} (SQLSTATE {exc.sqlstate})" if exc.sqlstate else text


def adapt(value: Any) -> Any:
    """A JSON value as a parameter of unknown type, for the server to cast to the column's."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return orjson.dumps(value).decode()


class _PostgresConnection:
    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        async with psycopg.AsyncRawCursor(self._connection) as cursor:
            await cursor.execute(sql, params or None)
            columns = [column.name for column in cursor.description or ()]
            return columns, await cursor.fetchall()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with psycopg.AsyncRawCursor(self._connection) as cursor:
            await cursor.execute(sql, params or None)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with psycopg.AsyncRawCursor(self._connection) as cursor:
            await cursor.executemany(sql, rows)


class PostgresDatabase:
    """A bounded psycopg_pool pool that reconnects in the background after an outage."""

    dialect = POSTGRES

    def __init__(self, dsn: str, *, pool_size: int, connect_timeout: float) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._pool: psycopg_pool.AsyncConnectionPool | None = None

    async def open(self) -> None:
        """Create the pool and wait (up to `connect_timeout`) for a first connection."""
        if self._pool is None:
            self._pool = psycopg_pool.AsyncConnectionPool(
                self.dsn,
                min_size=1,
                max_size=self.pool_size,
                open=False,
                kwargs={"autocommit": True, "connect_timeout": max(1, round(self.connect_timeout))},
                configure=_configure,
                check=psycopg_pool.AsyncConnectionPool.check_connection,
                timeout=self.connect_timeout,
                reconnect_timeout=365 * 86400.0,  # keep trying: messages wait for the database
                name="busway",
            )
            await self._pool.open(wait=False)
        with _translated():
            await self._pool.wait(timeout=self.connect_timeout)

    async def close(self) -> None:
        """Close the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5)

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection inside BEGIN ... COMMIT (ROLLBACK on any exception)."""
        if self._pool is None:
            with contextlib.suppress(RetryableError):
                await self.open()
        assert self._pool is not None
        with _translated():
            async with self._pool.connection() as connection, connection.transaction():
                yield _PostgresConnection(connection)


def listener(dsn: str, channel: str, connect_timeout: float) -> Listener:
    """A `Listener` that LISTENs on `channel` and calls `wake` for each notification."""

    async def listen(wake: Callable[[], None]) -> None:
        backoff = 0.0
        statement = psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(channel))
        while True:
            try:
                connection = await psycopg.AsyncConnection.connect(
                    dsn, autocommit=True, connect_timeout=max(1, round(connect_timeout))
                )
                async with connection:
                    await connection.execute(statement)
                    backoff = 0.0
                    wake()  # rows may have come while nobody listened
                    async for _ in connection.notifies():
                        wake()
            except psycopg.Error as exc:
                backoff = min(30.0, max(0.5, backoff * 2))
                logger.warning("LISTEN %s failed, retrying in %.1fs: %s", channel, backoff, exc)
                await anyio.sleep(backoff)

    return listen


def create_source(config: PostgresSourceConfig, context: BuildContext) -> SqlSource:
    """The source of a `type = "postgres"` config (no I/O here)."""
    database = PostgresDatabase(
        config.dsn, pool_size=config.pool_size, connect_timeout=float(config.connect_timeout)
    )
    wake = None
    if config.notify_channel is not None:
        wake = listener(config.dsn, config.notify_channel, float(config.connect_timeout))
    return SqlSource(config, database, listener=wake)


def create_sink(config: PostgresSinkConfig, context: BuildContext) -> SqlSink:
    """The sink of a `type = "postgres"` config (no I/O here)."""
    database = PostgresDatabase(
        config.dsn, pool_size=config.pool_size, connect_timeout=float(config.connect_timeout)
    )
    return SqlSink(config, database, adapt=adapt)


adapter: Adapter[PostgresSourceConfig, PostgresSinkConfig] = Adapter(
    type="postgres",
    source_config=PostgresSourceConfig,
    create_source=create_source,
    sink_config=PostgresSinkConfig,
    create_sink=create_sink,
)
