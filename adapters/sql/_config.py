"""The config keys the three database adapters share; each engine adds its connection keys.

A source runs in one of two modes:

* `incremental`: poll `SELECT * FROM table` (or `FROM (query)`) for rows past the stored
  watermark, ordered by the `watermark` columns;
* `outbox`: claim rows of an outbox table (`id`, `subject`, `headers`, `payload`), publish
  them, delete or mark them in the same transaction.

A sink writes each batch in one transaction, either mapped onto a table (`table`, `columns`,
optional `key` for an upsert) or through a parameterised `statement` with `params`.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from busway import Duration, SinkConfig, SourceConfig

__all__ = ["SqlSinkConfig", "SqlSourceConfig", "check_identifier"]

_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


def check_identifier(name: str, what: str) -> str:
    """`name` if it is a plain (optionally schema-qualified) SQL identifier, else ValueError.

    Identifiers are quoted into generated SQL, never bound as values, so only names made of
    letters, digits, `_` and `$` are accepted: nothing in a config can inject SQL there.
    """
    if not _IDENTIFIER.match(name):
        raise ValueError(
            f"{what} {name!r} must be a plain identifier (letters, digits, _ or $; "
            "optionally schema.name)"
        )
    return name


class SqlSourceConfig(SourceConfig, frozen=True, kw_only=True):
    """Keys every database source has, whatever the engine."""

    mode: Literal["incremental", "outbox"] = "incremental"
    table: str | None = None
    """incremental: the table to read; outbox: the outbox table (default `busway_outbox`)."""
    query: str | None = None
    """incremental: a SELECT to read instead of a table; it is wrapped as a subquery."""
    watermark: list[str] = msgspec.field(default_factory=lambda: ["id"])
    """incremental: columns in ascending order; together they must be unique per row."""
    key: list[str] | None = None
    """incremental: columns naming a row in its Nats-Msg-Id (default: the last watermark)."""
    json_columns: list[str] = msgspec.field(default_factory=list)
    """Text columns holding JSON, embedded as JSON rather than as a string."""
    interval: Duration = Duration(1.0)
    """How long to wait after a poll that found fewer than `batch_size` rows."""
    batch_size: int = 500
    """Rows read (or claimed) and published per poll, in one transaction."""
    on_publish: Literal["delete", "mark"] = "delete"
    """outbox: delete published rows, or set their `published_at`."""
    lease_ttl: Duration = Duration(10.0)
    """incremental: with several daemons one polls, holding a lease it renews every quarter
    of this; when it dies another takes over within 1.5 times this (a restarted daemon alone
    also waits up to that long for its previous incarnation's lease)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.interval <= 0:
            raise ValueError("interval must be positive")
        if self.lease_ttl < 0.2:
            raise ValueError("lease_ttl must be at least 200ms")
        if self.mode == "incremental":
            if (self.table is None) == (self.query is None):
                raise ValueError("an incremental source needs exactly one of `table` or `query`")
            if not self.watermark:
                raise ValueError("watermark needs at least one column")
        elif self.query is not None:
            raise ValueError("an outbox source reads its `table`; `query` is not used")
        if self.table is not None:
            check_identifier(self.table, "table")
        for column in [*self.watermark, *(self.key or []), *self.json_columns]:
            check_identifier(column, "column")

    @property
    def row_key(self) -> list[str]:
        """The columns naming a row in message ids."""
        return self.key or self.watermark[-1:]

    @property
    def outbox_table(self) -> str:
        """The outbox table of `outbox` mode."""
        return self.table or "busway_outbox"


class SqlSinkConfig(SinkConfig, frozen=True, kw_only=True):
    """Keys every database sink has, whatever the engine."""

    table: str | None = None
    columns: dict[str, str] = msgspec.field(default_factory=dict)
    """column name -> JMESPath expression over the message's JSON body."""
    key: list[str] = msgspec.field(default_factory=list)
    """Columns of the conflict target: with a key the insert is an idempotent upsert."""
    statement: str | None = None
    """Full control: a parameterised statement; values are bound, never interpolated."""
    params: list[str] = msgspec.field(default_factory=list)
    """JMESPath expressions giving the statement's parameters, in order."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.table is None) == (self.statement is None):
            raise ValueError("a database sink needs exactly one of `table` or `statement`")
        if self.table is not None:
            check_identifier(self.table, "table")
            if not self.columns:
                raise ValueError('`table` needs `columns = { column = "expression" }`')
            if self.params:
                raise ValueError("`params` belong to `statement`; with `table` use `columns`")
            for column in [*self.columns, *self.key]:
                check_identifier(column, "column")
            missing = [column for column in self.key if column not in self.columns]
            if missing:
                raise ValueError(f"key column(s) {missing} must also be mapped in `columns`")
        elif self.columns or self.key:
            raise ValueError("`columns` and `key` belong to `table`; a statement uses `params`")
