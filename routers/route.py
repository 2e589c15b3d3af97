"""A route compiled from its config: decode, match, transform, encode, in one call.

This is the broker-free half of a route: the engine hands `apply` the raw body of a message and
publishes what comes back to every `to` subject, acking the input once all are stored.
Expressions are compiled once here, at start-up; `apply` never parses anything.
"""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from busway.routers.context import CONTEXT_FUNCTIONS, MESSAGE_FUNCTIONS, MessageContext
from busway.routers.expression import (
    Expression,
    ExpressionRuntimeError,
    ExpressionSyntaxError,
    compile_expression,
)

__all__ = ["CompiledRoute", "RouteCompileError", "RoutingError", "compile_route"]


class RouteCompileError(Exception):
    """An expression of the route does not compile; `field` is `when` or `transform`."""

    def __init__(self, field: str, error: ExpressionSyntaxError) -> None:
        self.field = field
        self.error = error
        super().__init__(f"{field}: {error}")


class RoutingError(Exception):
    """A message cannot be routed, and retrying will not change that.

    `kind` is `decode` (the body is not JSON) or `expression` (an expression failed on this
    message, e.g. a type error); `expression` names the failing expression's source.
    """

    def __init__(self, kind: str, message: str, *, expression: str | None = None) -> None:
        self.kind = kind
        self.expression = expression
        super().__init__(message)


class CompiledRoute:
    """`when` → `transform` → encoded body, for one route. Pure: no I/O, no broker."""

    __slots__ = ("_transform", "_when", "name", "needs_context", "needs_json", "to")

    def __init__(
        self,
        *,
        name: str,
        to: Sequence[str],
        when: Expression | None = None,
        transform: Expression | None = None,
    ) -> None:
        self.name = name
        self.to = tuple(to)
        self._when = when
        self._transform = transform
        self.needs_json = when is not None or transform is not None
        self.needs_context = False
        """True if an expression reads the message context (`subject()`, `header()`...)."""

    def apply(self, data: bytes, context: MessageContext | None = None) -> bytes | None:
        """The body to publish to each of `to`, or None when `when` does not match.

        `context` is the message's subject, headers and metadata, for `subject()` & co.

        Raises RoutingError when the body is not JSON or an expression fails on it.
        """
        if not self.needs_json:
            return data
        try:
            document = orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RoutingError("decode", f"body is not valid JSON: {exc}") from None
        when = self._when
        if when is not None:
            try:
                if not when.is_truthy(document, context):
                    return None
            except ExpressionRuntimeError as exc:
                raise RoutingError("expression", f"when: {exc}", expression=when.source) from None
        transform = self._transform
        if transform is None:
            return data
        try:
            result = transform(document, context)
        except ExpressionRuntimeError as exc:
            raise RoutingError(
                "expression", f"transform: {exc}", expression=transform.source
            ) from None
        return orjson.dumps(result)


def compile_route(
    *, name: str, to: Sequence[str], when: str | None = None, transform: str | None = None
) -> CompiledRoute:
    """Compile a route's expressions; RouteCompileError names the field that failed.

    The route needs a per-message context only if an expression calls `subject()`,
    `header()` or `meta()`: found by compiling once more without those functions.
    """
    compiled: dict[str, Expression | None] = {"when": None, "transform": None}
    needs_context = False
    for field, source in (("when", when), ("transform", transform)):
        if source is not None:
            try:
                compiled[field] = compile_expression(source, functions=CONTEXT_FUNCTIONS)
            except ExpressionSyntaxError as exc:
                raise RouteCompileError(field, exc) from None
            try:
                compile_expression(source, functions=CONTEXT_FUNCTIONS[len(MESSAGE_FUNCTIONS) :])
            except ExpressionSyntaxError:
                needs_context = True
    route = CompiledRoute(name=name, to=to, when=compiled["when"], transform=compiled["transform"])
    route.needs_context = needs_context
    return route
