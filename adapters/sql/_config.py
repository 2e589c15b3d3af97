"""The config keys the three database adapters share; each engine adds its connection keys.

A source runs in one of two modes:

* `incremental`: poll `SELECT * FROM table` (or `FROM (query)`) for rows past the stored
  watermark, ordered by the `watermark` columns;
* `outbox`: claim rows of an outbox table (`id`, `subject`, `headers`, `payload`), publish
  them, delete or mark them in the same transaction.

A sink writes each batch in one transaction, either mapped onto a table (`table`, `columns`,
optional `key` for an upsert) or through a parameterised `statement` with `params`.

The engines' own config structs (connection keys) live here too, not in the engine modules:
this module imports no database driver, so `busway schema` documents every engine and
`busway check` decodes its keys whether or not the driver is installed.
"""

from __future__ import annotations

import re
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import msgspec

from busway import Duration, SinkConfig, SourceConfig

__all__ = [
    "MySqlSinkConfig",
    "MySqlSourceConfig",
    "PostgresSinkConfig",
    "PostgresSourceConfig",
    "SqlSinkConfig",
    "SqlSourceConfig",
    "SqliteSinkConfig",
    "SqliteSourceConfig",
    "check_identifier",
    "parse_mysql_dsn",
]

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
    """`incremental`: poll rows past a stored watermark; `outbox`: claim, publish and delete
    (or mark) the rows of a transactional outbox table."""
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
    """Pause between polls that found less than a full batch (a full batch is followed at
    once by the next); lower it for latency, raise it to spare the database."""
    batch_size: int = 500
    """Rows per poll (incremental) or per claim transaction (outbox); at least 1."""
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
    """The table each batch is written into, with `columns` (exactly one of `table` and
    `statement`); a plain or schema-qualified identifier."""
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


# ---------------------------------------------------------------------------------------------
# The engines' connection keys (their drivers are imported by the engine modules only)


class PostgresSourceConfig(SqlSourceConfig, tag="postgres", frozen=True, kw_only=True):
    """A PostgreSQL source: `dsn` is a libpq URL or `key=value` string."""

    dsn: str
    """libpq connection string: `postgresql://user:${PGPASSWORD}@host:5432/db` or
    `host=... dbname=...`; keep the password in `${ENV}` or `${file:...}`."""
    notify_channel: str | None = None
    """LISTEN on this channel: a notification (`pg_notify` from a trigger) polls at once;
    `interval` stays the safety net."""
    pool_size: int = 2
    """Most connections the source holds (the pool reconnects in the background); at least 1."""
    connect_timeout: Duration = Duration(5.0)
    """Limit of one connection attempt (rounded to whole seconds, at least 1); also how long
    a poll waits for a pooled connection."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.notify_channel is not None:
            check_identifier(self.notify_channel, "notify_channel")
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")


class PostgresSinkConfig(SqlSinkConfig, tag="postgres", frozen=True, kw_only=True):
    """A PostgreSQL sink; a `statement` uses `$1`, `$2`... placeholders."""

    dsn: str
    """libpq connection string: `postgresql://user:${PGPASSWORD}@host:5432/db` or
    `host=... dbname=...`; keep the password in `${ENV}` or `${file:...}`."""
    pool_size: int = 2
    """Most connections the sink holds (the pool reconnects in the background); at least 1."""
    connect_timeout: Duration = Duration(5.0)
    """Limit of one connection attempt (rounded to whole seconds, at least 1); also how long
    a write waits for a pooled connection."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pool_size < 1:
            raise ValueError("pool_size must be at least 1")


def parse_mysql_dsn(dsn: str) -> dict[str, Any]:
    """asyncmy's connection arguments from `mysql://user:password@host:3306/database`."""
    parts = urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname:
        raise ValueError("dsn must look like mysql://user:password@host:3306/database")
    return {
        "host": parts.hostname,
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path.lstrip("/")) or None,
    }


class MySqlSourceConfig(SqlSourceConfig, tag="mysql", frozen=True, kw_only=True):
    """A MySQL/MariaDB source: `dsn = "mysql://user:password@host:3306/database"`."""

    dsn: str
    """`mysql://user:${MYSQL_PASSWORD}@host:3306/database` (`mariadb://` too; port 3306 by
    default); percent-encode special characters of the user and password."""
    pool_size: int = 2
    """Most connections the source holds (the pool reconnects in the background)."""
    connect_timeout: Duration = Duration(5.0)
    """Limit of one connection attempt (rounded to whole seconds, at least 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_mysql_dsn(self.dsn)


class MySqlSinkConfig(SqlSinkConfig, tag="mysql", frozen=True, kw_only=True):
    """A MySQL/MariaDB sink; a `statement` uses `%s` placeholders."""

    dsn: str
    """`mysql://user:${MYSQL_PASSWORD}@host:3306/database` (`mariadb://` too; port 3306 by
    default); percent-encode special characters of the user and password."""
    pool_size: int = 2
    """Most connections the sink holds (the pool reconnects in the background)."""
    connect_timeout: Duration = Duration(5.0)
    """Limit of one connection attempt (rounded to whole seconds, at least 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_mysql_dsn(self.dsn)


class SqliteSourceConfig(SqlSourceConfig, tag="sqlite", frozen=True, kw_only=True):
    """A SQLite source on the database file at `path`."""

    path: str
    """The database file, relative to the config file; opened in WAL mode."""
    busy_timeout: Duration = Duration(5.0)
    """How long to wait for another writer's lock (SQLite has one writer at a time) before
    the poll or claim fails and is retried."""


class SqliteSinkConfig(SqlSinkConfig, tag="sqlite", frozen=True, kw_only=True):
    """A SQLite sink on the database file at `path`; a `statement` uses `?` placeholders."""

    path: str
    """The database file, relative to the config file; opened in WAL mode."""
    busy_timeout: Duration = Duration(5.0)
    """How long to wait for another writer's lock (SQLite has one writer at a time) before
    the batch fails and is retried with back-off."""
