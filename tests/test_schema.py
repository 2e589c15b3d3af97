"""`busway schema`: a JSON Schema that accepts real configs, and a reference of every adapter.

The reference page itself (docs/reference/config.md: current, every key described) is checked
in tests/test_docs.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest

from busway import default_registry
from busway._config.schema import config_reference, config_schema
from tests.support import REPO, run_cli


@pytest.fixture(scope="module")
def schema() -> dict[str, object]:
    return config_schema(default_registry())


def test_the_schema_is_valid_and_accepts_the_bundled_example(schema: dict[str, object]) -> None:
    jsonschema.Draft202012Validator.check_schema(schema)
    example = tomllib.loads((REPO / "deploy" / "busway.toml").read_text())
    jsonschema.validate(example, schema)


@pytest.mark.parametrize(
    ("mutation", "complaint"),
    [
        ({"shutdown_timeout": "soon"}, "does not match"),
        ({"routes": [{"name": "r", "from": "a", "stages": [{"nope": "x"}]}]}, "nope"),
        ({"sinks": [{"type": "file", "name": "f", "from": "a"}]}, "is not valid under any"),
        ({"nats": {"servers": "nats://x"}}, "is not of type 'array'"),
    ],
)
def test_the_schema_rejects_what_busway_rejects(
    schema: dict[str, object], mutation: dict[str, object], complaint: str
) -> None:
    with pytest.raises(jsonschema.ValidationError, match=complaint):
        jsonschema.validate(mutation, schema)


# Runs busway with the database drivers made unimportable, as on an installation without the
# `postgres` / `mysql` / `sqlite` extras.
_WITHOUT_DRIVERS = """
import sys
for name in ("psycopg", "psycopg_pool", "asyncmy", "aiosqlite"):
    sys.modules[name] = None  # `import name` now raises ImportError
from busway._cli.main import main
raise SystemExit(main(sys.argv[1:]))
"""


def _busway_without_drivers(
    *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _WITHOUT_DRIVERS, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_the_reference_documents_every_database_engine_without_its_driver() -> None:
    result = _busway_without_drivers("schema", "--markdown")
    assert result.returncode == 0, result.stderr
    for engine in ("postgres", "mysql", "sqlite"):
        assert f'`[[sources]] type = "{engine}"`' in result.stdout
        assert f'`[[sinks]] type = "{engine}"`' in result.stdout
    assert result.stdout == config_reference(default_registry())


def test_a_database_sink_without_its_driver_fails_check_naming_the_extra(tmp_path: Path) -> None:
    (tmp_path / "busway.toml").write_text(
        """
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[sinks]]
name = "orders-db"
type = "sqlite"
from = "orders.paid"
path = "shop.db"
statement = "INSERT INTO orders (body) VALUES (?)"
params = ["@"]
"""
    )
    result = _busway_without_drivers("check", "busway.toml", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "$.sinks[0]" in lines[0]
    assert "pip install 'busway[sqlite]'" in lines[0]
    assert "Traceback" not in result.stderr


def test_the_cli_prints_the_schema() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["title"] == "busway.toml"
    markdown = run_cli("schema", "--markdown")
    assert "## `[[routes]] stages` {#routes-stages}" in markdown.stdout
