"""The SQL the adapters generate, in each engine's spelling: quoting, placeholders, upserts.

Only identifiers checked by `check_identifier` are spliced into SQL, always quoted; values are
always bound parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["MYSQL", "POSTGRES", "SQLITE", "Dialect"]


@dataclass(frozen=True)
class Dialect:
    """One engine's spelling of the statements busway generates."""

    name: Literal["postgres", "mysql", "sqlite"]
    quote_char: str
    skip_locked: bool
    """`FOR UPDATE SKIP LOCKED` lets several daemons claim outbox rows side by side."""

    def quote(self, name: str) -> str:
        """`name` (maybe `schema.table`) quoted as identifiers."""
        q = self.quote_char
        return ".".join(f"{q}{part}{q}" for part in name.split("."))

    def placeholder(self, position: int) -> str:
        """The bound-parameter marker for the 1-based `position`."""
        if self.name == "postgres":
            return f"${position}"
        return "%s" if self.name == "mysql" else "?"

    def embed(self, sql: str) -> str:
        """User SQL made safe to combine with our placeholders (`%` is special to asyncmy)."""
        return sql.replace("%", "%%") if self.name == "mysql" else sql

    def insert(self, table: str, columns: Sequence[str], key: Sequence[str]) -> str:
        """An INSERT of one row of `columns`; an upsert on `key` when it is given."""
        names = ", ".join(self.quote(column) for column in columns)
        values = ", ".join(self.placeholder(i + 1) for i in range(len(columns)))
        sql = f"INSERT INTO {self.quote(table)} ({names}) VALUES ({values})"
        if not key:
            return sql
        updated = [column for column in columns if column not in key]
        if self.name == "mysql":
            # Fires on any unique key of the table, not only `key`: MySQL has no target.
            sets = updated or list(key[:1])
            assignments = ", ".join(f"{self.quote(c)} = VALUES({self.quote(c)})" for c in sets)
            return f"{sql} ON DUPLICATE KEY UPDATE {assignments}"
        target = ", ".join(self.quote(column) for column in key)
        if not updated:
            return f"{sql} ON CONFLICT ({target}) DO NOTHING"
        assignments = ", ".join(f"{self.quote(c)} = excluded.{self.quote(c)}" for c in updated)
        return f"{sql} ON CONFLICT ({target}) DO UPDATE SET {assignments}"

    def select_after(
        self, relation: str, watermark: Sequence[str], *, after: bool, limit: int
    ) -> str:
        """Rows of `relation` ordered by `watermark`, past a bound watermark when `after`.

        The condition is spelled out (`a > $1 OR (a = $2 AND b > $3)`) rather than as a row
        comparison, so MySQL uses an index on the columns too. Parameters: see `after_params`.
        """
        order = ", ".join(self.quote(column) for column in watermark)
        sql = f"SELECT * FROM {relation}"
        if after:
            clauses = []
            position = 0
            for i, column in enumerate(watermark):
                terms = []
                for previous in watermark[:i]:
                    position += 1
                    terms.append(f"{self.quote(previous)} = {self.placeholder(position)}")
                position += 1
                terms.append(f"{self.quote(column)} > {self.placeholder(position)}")
                clauses.append("(" + " AND ".join(terms) + ")")
            sql += " WHERE " + " OR ".join(clauses)
        return f"{sql} ORDER BY {order} LIMIT {int(limit)}"

    @staticmethod
    def after_params(values: Sequence[object]) -> list[object]:
        """The parameters of `select_after(after=True)` for watermark `values`."""
        params: list[object] = []
        for i in range(len(values)):
            params.extend(values[:i])
            params.append(values[i])
        return params

    def relation(self, table: str | None, query: str | None) -> str:
        """What an incremental source selects from: its table, or its query as a subquery."""
        if table is not None:
            return self.quote(table)
        assert query is not None
        return f"({self.embed(query.strip().rstrip(';'))}) AS busway_rows"

    def claim(self, table: str, limit: int, *, marked: bool) -> str:
        """Select (and lock, where the engine can) the next outbox rows."""
        sql = f"SELECT id, subject, headers, payload FROM {self.quote(table)}"
        if marked:
            sql += " WHERE published_at IS NULL"
        sql += f" ORDER BY id LIMIT {int(limit)}"
        if self.skip_locked:
            sql += " FOR UPDATE SKIP LOCKED"
        return sql

    def settle(self, table: str, count: int, *, marked: bool) -> str:
        """Delete (or mark published) the `count` outbox rows whose ids are bound."""
        ids = ", ".join(self.placeholder(i + 1) for i in range(count))
        if marked:
            now = "CURRENT_TIMESTAMP"
            return f"UPDATE {self.quote(table)} SET published_at = {now} WHERE id IN ({ids})"
        return f"DELETE FROM {self.quote(table)} WHERE id IN ({ids})"


POSTGRES = Dialect(name="postgres", quote_char='"', skip_locked=True)
MYSQL = Dialect(name="mysql", quote_char="`", skip_locked=True)
SQLITE = Dialect(name="sqlite", quote_char='"', skip_locked=False)
