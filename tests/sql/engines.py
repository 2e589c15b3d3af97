"""One test-side handle per database engine: its config keys, a connection, its DDL spelling.

The shared tests are written once against `Engine` and run for PostgreSQL, MariaDB and SQLite.
The test side talks to each database with the same driver the adapter uses, on a connection
of its own, so it checks what was committed, not what busway thinks it wrote.
"""

from __future__ import annotations

import abc
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncmy
import psycopg

from tests.sql.servers import MariaDBServer, PostgresServer

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "sql"


class Engine(abc.ABC):
    """A database under test."""

    type: str
    """The adapter's `type`."""
    mark: str
    """The test side's parameter marker."""
    decimal: str
    """A column type for exact decimals with 6 places."""

    @abc.abstractmethod
    def config(self) -> str:
        """The TOML keys that point an adapter at this database."""

    @abc.abstractmethod
    async def connect(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run one statement in its own committed transaction."""

    @abc.abstractmethod
    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run one statement per row, all in one committed transaction."""

    @abc.abstractmethod
    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Every row of a query."""

    @abc.abstractmethod
    async def create_outbox(self, table: str) -> None:
        """Create an outbox named `table` from the shipped DDL in deploy/sql/."""

    def marks(self, count: int) -> str:
        """`count` parameter markers, comma-separated."""
        return ", ".join([self.mark] * count)

    @abc.abstractmethod
    async def another_database(self, name: str) -> Engine:
        """The same engine on a new, empty database `name` (not yet connected)."""


class PostgresEngine(Engine):
    type = "postgres"
    mark = "%s"
    decimal = "numeric(20,6)"

    def __init__(self, server: PostgresServer, database: str = "postgres") -> None:
        self.server = server
        self.dsn = server.dsn.rsplit("/", 1)[0] + "/" + database
        self._connection: psycopg.AsyncConnection[Any] | None = None

    def config(self) -> str:
        return f'dsn = "{self.dsn}"'

    async def connect(self) -> None:
        self._connection = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True)

    async def another_database(self, name: str) -> PostgresEngine:
        await self.execute(f'CREATE DATABASE "{name}"')
        return PostgresEngine(self.server, name)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _ensure(self) -> psycopg.AsyncConnection[Any]:
        if self._connection is None or self._connection.closed:
            await self.connect()  # after a server restart
        assert self._connection is not None
        return self._connection

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        connection = await self._ensure()
        await connection.execute(sql, params or None)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        connection = await self._ensure()
        async with connection.transaction(), connection.cursor() as cursor:
            await cursor.executemany(sql, rows)

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        connection = await self._ensure()
        cursor = await connection.execute(sql, params or None)
        return await cursor.fetchall()

    async def create_outbox(self, table: str) -> None:
        script = (DEPLOY / "outbox.postgres.sql").read_text().replace("busway_outbox", table)
        await self.execute(script)


class MariaDBEngine(Engine):
    type = "mysql"
    mark = "%s"
    decimal = "DECIMAL(20,6)"

    def __init__(self, server: MariaDBServer, database: str = "busway") -> None:
        self.server = server
        self.database = database
        self._connection: Any = None

    def config(self) -> str:
        return f'dsn = "{self.server.dsn.rsplit("/", 1)[0]}/{self.database}"'

    async def another_database(self, name: str) -> MariaDBEngine:
        self.server.create_database(name)
        return MariaDBEngine(self.server, name)

    async def connect(self) -> None:
        self._connection = await asyncmy.connect(
            host="127.0.0.1",
            port=self.server.port,
            user="root",
            database=self.database,
            autocommit=True,
            init_command="SET time_zone = '+00:00'",
        )

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with self._connection.cursor() as cursor:
            await cursor.execute(sql, tuple(params) or None)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        await self._connection.begin()
        async with self._connection.cursor() as cursor:
            await cursor.executemany(sql, [tuple(row) for row in rows])
        await self._connection.commit()

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._connection.cursor() as cursor:
            await cursor.execute(sql, tuple(params) or None)
            return list(await cursor.fetchall())

    async def create_outbox(self, table: str) -> None:
        script = (DEPLOY / "outbox.mysql.sql").read_text().replace("busway_outbox", table)
        script = re.sub(r"--[^\n]*", "", script)
        for statement in script.split(";"):
            if statement.strip():
                await self.execute(statement)


class SqliteEngine(Engine):
    type = "sqlite"
    mark = "?"
    decimal = "TEXT"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None

    def config(self) -> str:
        return f'path = "{self.path}"'

    async def another_database(self, name: str) -> SqliteEngine:
        return SqliteEngine(self.path.with_name(f"{name}.db"))

    async def connect(self) -> None:
        self._connection = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        self._connection.execute("PRAGMA journal_mode = WAL")

    async def close(self) -> None:
        if self._connection is not None:
            self._connection.close()

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        assert self._connection is not None
        self._connection.execute(sql, tuple(params))

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        assert self._connection is not None
        with self._connection:
            self._connection.execute("BEGIN IMMEDIATE")
            self._connection.executemany(sql, [tuple(row) for row in rows])
            self._connection.execute("COMMIT")

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        assert self._connection is not None
        return self._connection.execute(sql, tuple(params)).fetchall()

    async def create_outbox(self, table: str) -> None:
        assert self._connection is not None
        script = (DEPLOY / "outbox.sqlite.sql").read_text().replace("busway_outbox", table)
        self._connection.executescript(script)
