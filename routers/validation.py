"""The `validate` stage's checkers: a JSON Schema file, or a msgspec type named by import path.

Both return None for a valid body, or `(path, message)` for the first problem found, so the
dead letter says which field failed (`$.items[2].qty`) and why.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson

from busway.routers.user_code import load_object

__all__ = ["Validator", "schema_validator", "type_validator"]

Validator = Callable[[Any], tuple[str, str] | None]


def schema_validator(path: Path) -> Validator:
    """Validate against the JSON Schema in `path` (its `$schema` picks the draft; default 2020-12).

    The schema itself is checked here, at start-up, so a broken schema is a config error.
    """
    import jsonschema  # imported on use: only routes with a schema pay for it

    try:
        schema = orjson.loads(path.read_bytes())
    except OSError as exc:
        raise ValueError(f"cannot read schema {path}: {exc.strerror}") from None
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"schema {path} is not valid JSON: {exc}") from None
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"schema {path} is not a valid JSON Schema: {exc.message}") from None
    validator = cls(schema)

    def check(document: Any) -> tuple[str, str] | None:
        error = jsonschema.exceptions.best_match(validator.iter_errors(document))
        if error is None:
            return None
        return error.json_path, error.message

    return check


def type_validator(reference: str) -> Validator:
    """Validate by converting the body to the msgspec type (or any type msgspec understands)."""
    kind = load_object(reference)

    def check(document: Any) -> tuple[str, str] | None:
        try:
            msgspec.convert(document, kind)
        except msgspec.ValidationError as exc:
            detail, _, where = str(exc).rpartition(" - at `")
            if not detail:
                return "$", str(exc)
            return where[:-1], detail
        return None

    return check
