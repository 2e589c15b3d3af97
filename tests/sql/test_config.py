"""Database adapter configs: mistakes are reported at `busway check` time, with their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from busway import ConfigError, decode_config, default_registry
from busway._config.plan import build_plan

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "sql" / "busway.toml"

HEAD = """
[[streams]]
name = "S"
subjects = ["s.>"]
"""


def plan(text: str) -> None:
    registry = default_registry()
    config = decode_config(
        HEAD + text,
        source_types=registry.source_config,
        sink_types=registry.sink_config,
        environ={},
    )
    build_plan(config, registry)


def test_the_shipped_example_config_builds() -> None:
    registry = default_registry()
    config = decode_config(
        EXAMPLE.read_text(),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
        environ={"PGPASSWORD": "secret", "MYSQL_PASSWORD": "secret"},
    )
    built = build_plan(config, registry)
    assert [type(source).__name__ for _, source in built.sources] == ["SqlSource", "SqlSource"]
    assert [type(sink).__name__ for _, sink in built.sinks] == ["SqlSink"]


def test_a_bad_column_expression_names_its_column() -> None:
    with pytest.raises(ConfigError, match=r"\$\.sinks\[0\]\.columns\.total"):
        plan(
            """
[[sinks]]
name = "db"
type = "postgres"
from = "s.x"
dsn = "postgresql://localhost/db"
table = "orders"
columns = { id = "id", total = "total >" }
key = ["id"]
"""
        )


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ('table = "orders; DROP TABLE orders"', "must be a plain identifier"),
        ('table = "t"\nquery = "SELECT 1"', "exactly one of `table` or `query`"),
        ('table = "t"\nwatermark = []', "watermark needs at least one column"),
        ('mode = "outbox"\nquery = "SELECT 1"', "`query` is not used"),
        ('table = "t"\nbatch_size = 0', "batch_size must be at least 1"),
        ('mode = "outbox"\nsubject = "s.{region}"', "column(s) ['region']"),
    ],
)
def test_source_mistakes_are_config_errors(keys: str, expected: str) -> None:
    if "subject =" not in keys:
        keys = 'subject = "s.x"\n' + keys
    with pytest.raises(ConfigError, match="sources") as error:
        plan(
            f"""
[[sources]]
name = "db"
type = "sqlite"
path = "app.db"
{keys}
"""
        )
    assert expected in str(error.value)


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ('table = "t"\ncolumns = { id = "id" }\nkey = ["other"]', "must also be mapped"),
        ('table = "t"', "needs `columns"),
        ('statement = "INSERT INTO t VALUES (%s)"\ncolumns = { id = "id" }', "belong to `table`"),
        ('columns = { id = "id" }', "exactly one of `table` or `statement`"),
        ('dsn = "postgres://nope"\ntable = "t"\ncolumns = { id = "id" }', "mysql://"),
    ],
)
def test_sink_mistakes_are_config_errors(keys: str, expected: str) -> None:
    if "dsn =" not in keys:
        keys = 'dsn = "mysql://root@127.0.0.1/db"\n' + keys
    with pytest.raises(ConfigError, match="sinks") as error:
        plan(
            f"""
[[sinks]]
name = "db"
type = "mysql"
from = "s.x"
{keys}
"""
        )
    assert expected in str(error.value)
