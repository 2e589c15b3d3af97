"""The exceptions of `busway.routers.expression`.

    ExpressionError             any problem with an expression: .kind, .expression, .position
    ├── ExpressionSyntaxError   compile time: the expression is rejected before any message
    └── ExpressionRuntimeError  evaluation time: a function got a value of the wrong type

The `kind` strings are those of the JMESPath compliance suite, so a test (or an operator reading a
log line) can tell *what* went wrong without parsing prose. The hierarchy is deliberately plain
`Exception` and independent of busway's own tree: the expression package is pure and usable on its
own; busway's config layer wraps `ExpressionSyntaxError` into its `ConfigError` where it loads
routes. jmespath's own exceptions never leave the package: they are translated once, where the
parser is called.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal

__all__ = [
    "CompileErrorKind",
    "ExpressionError",
    "ExpressionRuntimeError",
    "ExpressionSyntaxError",
    "RuntimeErrorKind",
    "describe_value",
    "type_name",
]

#: Kinds raised at compile time. `invalid-type` / `invalid-value` appear here only when the
#: problem is certain from the text alone (a literal of the wrong type passed to a built-in, a
#: slice step of zero): reporting it at start-up beats failing on the first message.
CompileErrorKind = Literal[
    "syntax", "unknown-function", "invalid-arity", "invalid-type", "invalid-value"
]
#: Kinds raised while evaluating.
RuntimeErrorKind = Literal["invalid-type", "invalid-value"]

_PREVIEW_CHARS: Final = 40

_JSON_TYPE_NAMES: Final[dict[type, str]] = {
    dict: "object",
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


def type_name(value: Any) -> str:
    """The JMESPath type name of `value` ("number", "object", "expref", ...).

    Error messages speak JMESPath, not Python: an operator writing `length(total)` should read
    "got number", not "got int". Values that are not JSON (only custom functions can produce
    them) are named by their Python type so the message still points at the culprit.
    """
    name = _JSON_TYPE_NAMES.get(type(value))
    if name is not None:
        return name
    for py_type, json_name in _JSON_TYPE_NAMES.items():
        if isinstance(value, py_type):
            return json_name
    if getattr(value, "_is_expref", False):
        return "expref"
    return f"Python {type(value).__qualname__}"


def describe_value(value: Any) -> str:
    """`type_name` plus a short preview of the value, for error messages."""
    kind = type_name(value)
    if kind == "expref" or value is None:
        return kind
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > _PREVIEW_CHARS:
        text = text[: _PREVIEW_CHARS - 3] + "..."
    return f"{kind} {text}"


class ExpressionError(Exception):
    """Base of every error about an expression.

    Attributes are structured (not only a message) because callers act on them: busway's config
    loader points at the offending route key, tests assert on `kind`, the CLI underlines
    `position`.
    """

    kind: str
    detail: str
    expression: str | None
    position: int | None

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        expression: str | None = None,
        position: int | None = None,
    ) -> None:
        self.kind = kind
        self.detail = detail
        self.expression = expression
        self.position = position
        super().__init__(kind, detail)

    def __str__(self) -> str:
        where = ""
        if self.position is not None:
            where = f" at position {self.position}"
        if self.expression is not None:
            where += f" in expression {self.expression!r}"
        return f"{self.kind}: {self.detail}{where}"

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only attributes would be lost by the default pickling of exceptions (which
        # replays `args`); errors cross process boundaries in worker pools, so keep them.
        return (
            _rebuild,
            (type(self), self.kind, self.detail, self.expression, self.position),
        )

    def located(self, expression: str, position: int | None) -> ExpressionError:
        """Fill in where the error happened, unless an inner call site already did.

        Used by the compiled call sites: the innermost function call knows its own position, so
        outer ones must not overwrite it.
        """
        if self.expression is None:
            self.expression = expression
            self.position = position
        return self


def _rebuild(
    cls: type[ExpressionError],
    kind: str,
    detail: str,
    expression: str | None,
    position: int | None,
) -> ExpressionError:
    return cls(kind, detail, expression=expression, position=position)


class ExpressionSyntaxError(ExpressionError):
    """The expression cannot be compiled; raised by `compile_expression`, never per message.

    `kind` is "syntax" (malformed text), "unknown-function", "invalid-arity", or — when a type
    or value error is certain from the text alone — "invalid-type" / "invalid-value". The
    message says what is wrong and what was expected, and underlines `position` when known,
    because this error is read by a human fixing a configuration file.
    """

    def __str__(self) -> str:
        text = super().__str__()
        if self.expression is None or self.position is None or "\n" in self.expression:
            return text
        return f"{text}\n  {self.expression}\n  {' ' * self.position}^"


class ExpressionRuntimeError(ExpressionError):
    """Evaluating a compiled expression failed for this particular document.

    `kind` is "invalid-type" or "invalid-value"; the message names the function, the expected
    type and the type actually received. Raised per message, so the router can dead-letter that
    message and go on.
    """
