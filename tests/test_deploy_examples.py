"""Every example config in deploy/ compiles (as `busway check` does) and fits the JSON Schema."""

from __future__ import annotations

import base64
import tomllib
from pathlib import Path

import jsonschema
import pytest

from busway import default_registry, load_config
from busway._config.plan import build_plan
from busway._config.schema import config_schema
from tests.support import REPO

EXAMPLES = sorted(p for p in (REPO / "deploy").rglob("busway.toml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: str(p.relative_to(REPO)))
def test_the_example_compiles_and_fits_the_schema(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Examples take their secrets from the environment, as a deployment would.
    secrets = {
        "PGPASSWORD": "example-secret",
        "MYSQL_PASSWORD": "example-secret",
        "CRM_TOKEN": "example-secret",
        "CRM_URL": "https://crm.example",
        "WEBHOOK_SECRET": "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode(),
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    registry = default_registry()
    config = load_config(path, source_types=registry.source_config, sink_types=registry.sink_config)
    plan = build_plan(config, registry, file=str(path))
    assert plan.routes or plan.sources or plan.sinks
    jsonschema.validate(tomllib.loads(path.read_text()), config_schema(registry))


def test_there_are_examples_for_every_adapter_folder() -> None:
    assert {p.parent.name for p in EXAMPLES} >= {"deploy", "files", "http", "sql"}
