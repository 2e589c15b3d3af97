"""Database adapters: PostgreSQL, MySQL/MariaDB and SQLite sources and sinks.

One module per engine (`postgres`, `mysql`, `sqlite`) holds the only import of its driver;
everything else is shared:

    _config     every config key (shared and per engine), importable without any driver
    _dialect    the SQL generated per engine: quoting, placeholders, upserts, claims
    _database   the small interface an engine implements, and how errors are classified
    _poller     incremental mode: rows past the watermark; the watermark after the PubAcks
    _outbox     outbox mode: claim, publish, await PubAcks, delete/mark, commit
    _source     the poll loop: interval, wake-ups (LISTEN/NOTIFY), back-off
    _sink       batched writes in one transaction, bisection down to a refused row
    _types      database values as JSON; watermarks that decode to the same types
    _subject    `subject = "orders.{region}"` templates over a row's columns
    _confirm    awaiting every PubAck of a poll before anything is committed

The adapters below are what the entry points name. They carry the config structs and import
their engine module (and so its driver) only when a component is built: `busway schema`
documents every engine and a config decodes whether or not a driver is installed, and a
component whose driver is missing fails `busway check` with the `pip install` to run.
Nothing here is imported by the engine: a deployment without databases never loads a driver.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar

from busway import Adapter, BuildContext, ConfigError, Sink, Source
from busway.adapters.sql._config import (
    MySqlSinkConfig,
    MySqlSourceConfig,
    PostgresSinkConfig,
    PostgresSourceConfig,
    SqliteSinkConfig,
    SqliteSourceConfig,
)

__all__ = ["mysql_adapter", "postgres_adapter", "sqlite_adapter"]

C = TypeVar("C")


def _engine(name: str) -> Any:
    """The engine module `name`, imported now; ConfigError naming the extra if its driver is
    missing (the engine module's ImportError already says which `pip install` to run)."""
    try:
        return importlib.import_module(f"busway.adapters.sql.{name}")
    except ImportError as exc:
        raise ConfigError(str(exc)) from None


def _source_factory(name: str, config_type: type[C]) -> Callable[[C, BuildContext], Source]:
    def create_source(config: C, context: BuildContext) -> Source:
        source: Source = _engine(name).create_source(config, context)
        return source

    return create_source


def _sink_factory(name: str, config_type: type[C]) -> Callable[[C, BuildContext], Sink]:
    def create_sink(config: C, context: BuildContext) -> Sink:
        sink: Sink = _engine(name).create_sink(config, context)
        return sink

    return create_sink


postgres_adapter: Adapter[PostgresSourceConfig, PostgresSinkConfig] = Adapter(
    type="postgres",
    source_config=PostgresSourceConfig,
    create_source=_source_factory("postgres", PostgresSourceConfig),
    sink_config=PostgresSinkConfig,
    create_sink=_sink_factory("postgres", PostgresSinkConfig),
)
"""PostgreSQL (psycopg 3, `pip install 'busway[postgres]'`)."""

mysql_adapter: Adapter[MySqlSourceConfig, MySqlSinkConfig] = Adapter(
    type="mysql",
    source_config=MySqlSourceConfig,
    create_source=_source_factory("mysql", MySqlSourceConfig),
    sink_config=MySqlSinkConfig,
    create_sink=_sink_factory("mysql", MySqlSinkConfig),
)
"""MySQL >= 8.0 and MariaDB >= 10.6 (asyncmy, `pip install 'busway[mysql]'`)."""

sqlite_adapter: Adapter[SqliteSourceConfig, SqliteSinkConfig] = Adapter(
    type="sqlite",
    source_config=SqliteSourceConfig,
    create_source=_source_factory("sqlite", SqliteSourceConfig),
    sink_config=SqliteSinkConfig,
    create_sink=_sink_factory("sqlite", SqliteSinkConfig),
)
"""SQLite (aiosqlite, `pip install 'busway[sqlite]'`)."""
