"""What the shared source and sink code needs from an engine: connections and one SQL dialect.

Each engine module (`postgres`, `mysql`, `sqlite`) implements `Database` on its driver and is
the only place that imports that driver: it translates the driver's exceptions, once, into

    RetryableError   the database is unreachable, restarting, locked, or the statement does
                     not fit the schema (yet): the whole batch waits and is retried;
    RowError         this row's values are refused (constraint, bad value): a sink bisects
                     its batch down to the row and dead-letters it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

from busway import PermanentError
from busway.adapters.sql._dialect import Dialect

__all__ = ["Connection", "Database", "RowError", "Rows"]

Rows = tuple[list[str], list[Sequence[Any]]]
"""Column names, and the rows as sequences in that column order."""


class RowError(PermanentError):
    """The database refused the values of a row (a data or integrity error)."""


class Connection(Protocol):
    """One connection inside a transaction that `Database.transaction` opened."""

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        """Run a query and return every row."""
        ...

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        """Run a statement."""
        ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Run a statement once per parameter row, batched by the driver."""
        ...


class Database(Protocol):
    """A pool of connections to one database, in one SQL dialect."""

    dialect: Dialect

    async def open(self) -> None:
        """Create the pool; RetryableError if the database cannot be reached yet."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...

    def transaction(self, *, write: bool = False) -> AbstractAsyncContextManager[Connection]:
        """A connection in a transaction: committed when the block exits, else rolled back.

        `write` says the transaction will write (SQLite takes its write lock up front).
        """
        ...
