"""`busway schema`: a JSON Schema that accepts real configs, and a README reference kept current."""

from __future__ import annotations

import json
import tomllib

import jsonschema
import pytest

from busway import default_registry
from busway._config.schema import REFERENCE_END, REFERENCE_START, config_reference, config_schema
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


def test_the_readme_reference_is_current() -> None:
    readme = (REPO / "README.md").read_text()
    embedded = readme.split(REFERENCE_START, 1)[1].split(REFERENCE_END, 1)[0].strip()
    assert embedded == config_reference(default_registry()).strip(), (
        "README's config reference is stale: run `busway schema --update-readme README.md`"
    )


def test_the_cli_prints_the_schema() -> None:
    result = run_cli("schema")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["title"] == "busway.toml"
    markdown = run_cli("schema", "--markdown")
    assert "#### `[[routes]] stages`" in markdown.stdout
