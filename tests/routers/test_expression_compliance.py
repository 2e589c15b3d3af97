"""Every case of the JMESPath compliance suite, against the compiled expressions.

The suite lives in the shared folder beside the repository (`shared/jmespath-compliance`); it
is the referee for "compiled closures mean the same as JMESPath". Errors are checked for their
kind *and* their phase: syntax, unknown-function and invalid-arity must be caught by
`compile_expression` (at start-up); invalid-type and invalid-value by evaluation, or already at
compile time when the text alone proves them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from busway.routers.expression import (
    Expression,
    ExpressionRuntimeError,
    ExpressionSyntaxError,
    compile_expression,
)

SUITE_DIR = Path(__file__).resolve().parents[3] / "shared" / "jmespath-compliance"
COMPILE_TIME_KINDS = frozenset({"syntax", "unknown-function", "invalid-arity"})
EITHER_TIME_KINDS = frozenset({"invalid-type", "invalid-value"})


def _load_cases() -> list[Any]:
    if not SUITE_DIR.is_dir():
        return [
            pytest.param(
                None,
                None,
                {},
                id="suite-missing",
                marks=pytest.mark.skip(
                    reason=f"JMESPath compliance suite not found at {SUITE_DIR}"
                ),
            )
        ]
    params = []
    for path in sorted(SUITE_DIR.glob("*.json")):
        suites = json.loads(path.read_text(encoding="utf-8"))
        number = 0
        for suite in suites:
            for case in suite["cases"]:
                params.append(
                    pytest.param(
                        suite["given"], case["expression"], case, id=f"{path.stem}-{number}"
                    )
                )
                number += 1
    return params


def json_same(actual: Any, expected: Any) -> bool:
    """Equality as JSON sees it: 1 == 1.0 (one number type), but true != 1, key order free."""
    if isinstance(expected, bool) or isinstance(actual, bool):
        return actual is expected
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return actual == expected
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(json_same(a, e) for a, e in zip(actual, expected, strict=True))
        )
    if isinstance(expected, dict):
        return (
            isinstance(actual, dict)
            and actual.keys() == expected.keys()
            and all(json_same(actual[key], value) for key, value in expected.items())
        )
    return type(actual) is type(expected) and actual == expected


def test_suite_is_complete() -> None:
    """Guards against a truncated checkout silently shrinking the run."""
    if not SUITE_DIR.is_dir():
        pytest.skip(f"JMESPath compliance suite not found at {SUITE_DIR}")
    assert len(list(SUITE_DIR.glob("*.json"))) >= 12
    assert len(_load_cases()) >= 700


@pytest.mark.parametrize(("given", "expression", "case"), _load_cases())
def test_compliance(given: Any, expression: str, case: dict[str, Any]) -> None:
    if "error" in case:
        _expect_error(given, expression, case["error"])
        return
    compiled = compile_expression(expression)
    actual = compiled(given)
    assert json_same(actual, case["result"]), (
        f"{expression!r}: got {actual!r}, expected {case['result']!r}"
    )
    assert compiled.is_truthy(given) == _truthy(case["result"])


def _expect_error(given: Any, expression: str, kind: str) -> None:
    if kind in COMPILE_TIME_KINDS:
        with pytest.raises(ExpressionSyntaxError) as caught:
            compile_expression(expression)
        assert caught.value.kind == kind
        assert caught.value.expression == expression
        return
    assert kind in EITHER_TIME_KINDS, f"unknown error kind in the suite: {kind}"
    compiled, static_error = _try_compile(expression)
    if static_error is not None:  # proven from the text alone: fine, and earlier
        assert static_error.kind == kind, str(static_error)
        return
    assert compiled is not None
    with pytest.raises(ExpressionRuntimeError) as failed:
        compiled(given)
    assert failed.value.kind == kind
    assert failed.value.expression == expression


def _try_compile(expression: str) -> tuple[Expression | None, ExpressionSyntaxError | None]:
    try:
        return compile_expression(expression), None
    except ExpressionSyntaxError as error:
        return None, error


def _truthy(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return True
    return bool(value)
