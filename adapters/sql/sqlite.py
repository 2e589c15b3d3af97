"""The `sqlite` source and sink, on aiosqlite (the standard sqlite3 module in a thread).

    [[sources]]
    name = "outbox"
    type = "sqlite"
    path = "var/app.db"                 # relative to the config file
    mode = "outbox"
    subject = "{subject}"

SQLite has one writer at a time, so it has no `SKIP LOCKED`: an outbox claim and a sink batch
open with `BEGIN IMMEDIATE`, taking the write lock up front. Two daemons sharing one outbox
take turns; the second waits (up to `busy_timeout`) and then finds the rows already gone.
The database runs in WAL mode, so readers (and incremental polls) never block the writer.

SQLite stores what it is given: keep money in TEXT or integer cents (REAL rounds), and list
TEXT columns holding JSON in the source's `json_columns`.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import orjson

try:
    import aiosqlite
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the sqlite adapter needs aiosqlite ({exc}): pip install 'busway[sqlite]'"
    ) from exc

from busway import Adapter, BuildContext, Duration, RetryableError
from busway.adapters.sql._config import SqlSinkConfig, SqlSourceConfig
from busway.adapters.sql._database import Connection, RowError, Rows
from busway.adapters.sql._dialect import SQLITE
from busway.adapters.sql._sink import SqlSink
from busway.adapters.sql._source import SqlSource

__all__ = [
    "SqliteDatabase",
    "SqliteSinkConfig",
    "SqliteSourceConfig",
    "adapter",
    "create_sink",
    "create_source",
]


class SqliteSourceConfig(SqlSourceConfig, tag="sqlite", frozen=True, kw_only=True):
    """A SQLite source on the database file at `path`."""

    path: str
    busy_timeout: Duration = Duration(5.0)


class SqliteSinkConfig(SqlSinkConfig, tag="sqlite", frozen=True, kw_only=True):
    """A SQLite sink on the database file at `path`; a `statement` uses `?` placeholders."""

    path: str
    busy_timeout: Duration = Duration(5.0)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """sqlite3's exceptions as busway's (see `_database`)."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.DataError) as exc:
        raise RowError(f"SQLite: {exc}") from exc
    except sqlite3.Error as exc:
        raise RetryableError(f"SQLite: {exc}") from exc


def adapt(value: Any) -> Any:
    """A JSON value as a sqlite3 parameter (objects and arrays as JSON text)."""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


class _SqliteConnection:
    def __init__(self, connection: aiosqlite.Connection) -> None:
        self._connection = connection

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        async with self._connection.execute(sql, tuple(params)) as cursor:
            columns = [column[0] for column in cursor.description or ()]
            return columns, list(await cursor.fetchall())

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        await self._connection.execute(sql, tuple(params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._connection.executemany(sql, [tuple(row) for row in rows])


class SqliteDatabase:
    """One connection to a database file, used by one task at a time."""

    dialect = SQLITE

    def __init__(self, path: str, *, busy_timeout: float) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._connection: aiosqlite.Connection | None = None
        self._lock = anyio.Lock()

    async def open(self) -> None:
        """Open the file in WAL mode; RetryableError if it cannot be opened."""
        if self._connection is not None:
            return
        with _translated():
            connection = await aiosqlite.connect(
                self.path, isolation_level=None, timeout=self.busy_timeout
            )
            try:
                await connection.execute("PRAGMA journal_mode = WAL")
                await connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            except BaseException:
                await connection.close()
                raise
        self._connection = connection

    async def close(self) -> None:
        """Close the connection."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.close()

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool = False) -> AsyncIterator[Connection]:
        """BEGIN (IMMEDIATE when `write`) ... COMMIT, ROLLBACK on any exception."""
        async with self._lock:
            await self.open()
            connection = self._connection
            assert connection is not None
            with _translated():
                await connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield _SqliteConnection(connection)
                    await connection.execute("COMMIT")
                except BaseException:
                    with anyio.move_on_after(5, shield=True), contextlib.suppress(sqlite3.Error):
                        await connection.execute("ROLLBACK")
                    raise


def create_source(config: SqliteSourceConfig, context: BuildContext) -> SqlSource:
    """The source of a `type = "sqlite"` config (no I/O here)."""
    database = SqliteDatabase(
        str(context.resolve_path(config.path)), busy_timeout=float(config.busy_timeout)
    )
    return SqlSource(config, database)


def create_sink(config: SqliteSinkConfig, context: BuildContext) -> SqlSink:
    """The sink of a `type = "sqlite"` config (no I/O here)."""
    database = SqliteDatabase(
        str(context.resolve_path(config.path)), busy_timeout=float(config.busy_timeout)
    )
    return SqlSink(config, database, adapt=adapt)


adapter: Adapter[SqliteSourceConfig, SqliteSinkConfig] = Adapter(
    type="sqlite",
    source_config=SqliteSourceConfig,
    create_source=create_source,
    sink_config=SqliteSinkConfig,
    create_sink=create_sink,
)
