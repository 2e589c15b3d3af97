"""JMESPath expressions compiled to Python closures, for route predicates and mappings.

    expr = compile_expression("total > `100` && status == 'paid'")
    expr(doc)              # the value (JMESPath semantics)
    expr.is_truthy(doc)    # the value's JMESPath truthiness, as a bool: for `when =` predicates

Why compile: a router evaluates the same few expressions against every message. jmespath's
interpreter re-walks the AST each time; here the syntax is parsed by jmespath's parser once,
then each AST node becomes a closure that has captured its constants, so evaluating is a
handful of direct Python calls: 12-20x faster than `jmespath.search` for predicates and
mappings, ~8x for array-heavy function calls (see benches/bench_expressions.py).

All errors are `ExpressionError`s: `ExpressionSyntaxError` from `compile_expression` (bad text,
unknown function, wrong arity: found at start-up), `ExpressionRuntimeError` from evaluation
(a function received the wrong type for this document). Nothing here depends on NATS or on the
rest of busway; the only dependency is jmespath's parser.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any, Final

from ._compiler import compile_tree
from ._errors import ExpressionError, ExpressionRuntimeError, ExpressionSyntaxError
from ._functions import BUILTINS, Evaluator, Function, Predicate

__all__ = [
    "BUILTIN_FUNCTIONS",
    "Expression",
    "ExpressionError",
    "ExpressionRuntimeError",
    "ExpressionSyntaxError",
    "Function",
    "compile_expression",
]

#: Names of the JMESPath built-in functions; custom `Function`s may not reuse them.
BUILTIN_FUNCTIONS: Final[frozenset[str]] = frozenset(BUILTINS)

FunctionsArg = Mapping[str, Function] | Iterable[Function] | None

#: The longest expression accepted. Real ones are a few hundred characters; the parser is
#: recursive and some shapes (`a.a.a...`) compile in quadratic time, so a megabyte of text
#: would exhaust the stack or take minutes at start-up instead of failing at once.
MAX_EXPRESSION_CHARS: Final = 16_384


class Expression(functools.partial[Any]):
    """A compiled JMESPath expression. Immutable and thread-safe (the closures keep no state
    between calls): one instance serves every message of a route. Build it with
    `compile_expression`.

    `expr(doc, ctx=None)` evaluates against `doc`; `ctx` is handed to custom functions
    declared with `pass_context=True` (busway passes the message, for `subject()` or
    `header()`). It raises `ExpressionRuntimeError` when a function receives a value of the
    wrong type. The result may share objects with `doc`: copy before mutating in place.

    `expr.is_truthy(doc, ctx=None)` says whether that value is JMESPath-true (not false, null,
    "", [] or {}; 0 *is* true). It is compiled separately for predicates: `a && b` and
    comparisons yield Python booleans directly instead of building values and testing them.

    Why a `functools.partial` subclass: calling an instance of an ordinary class with a
    `__call__` method costs a slot lookup and a bound-method frame (about 70 ns on CPython
    3.11, a fifth of a typical predicate); partial's C-level call goes straight to the
    compiled closure. For the same reason `is_truthy` is the compiled closure itself, stored
    on the instance, not a method wrapping it.
    """

    __slots__ = ("_functions", "is_truthy", "source")

    source: str
    is_truthy: Predicate
    _functions: Mapping[str, Function]

    def __new__(
        cls,
        source: str,
        evaluate: Evaluator,
        predicate: Predicate,
        functions: Mapping[str, Function],
    ) -> Expression:
        """Wrap compiled closures; use `compile_expression` rather than calling this."""
        self = super().__new__(cls, evaluate)
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "is_truthy", predicate)
        object.__setattr__(self, "_functions", functions)
        return self

    def __setattr__(self, name: str, value: Any) -> None:
        # Routes share one instance across workers; a changed `source` would lie in logs.
        raise AttributeError(f"Expression is immutable; cannot set {name!r}")

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Closures cannot be pickled or copied meaningfully: recompile from the text instead.
        return (compile_expression, (self.source, dict(self._functions)))


def compile_expression(source: str, functions: FunctionsArg = None) -> Expression:
    """Parse and compile `source` once; evaluate the result many times.

    `functions` adds custom functions, given as `Function`s (any iterable) or as a mapping from
    name to `Function`. Everything that can be checked without a document is checked here, so
    a bad route fails at start-up: syntax, unknown functions, arity, `&expr` misuse, literal
    arguments of the wrong type, slice steps of zero.

    Raises `ExpressionSyntaxError` for a bad expression, `ValueError`/`TypeError` for bad
    `functions` (a programming error rather than a configuration one).
    """
    table = _function_table(functions)
    if len(source) > MAX_EXPRESSION_CHARS:
        raise ExpressionSyntaxError(
            "syntax",
            f"the expression is {len(source)} characters long, more than the "
            f"{MAX_EXPRESSION_CHARS} allowed: split it into stages",
        )
    try:
        evaluate, predicate = compile_tree(source, table)
    except RecursionError:
        raise ExpressionSyntaxError(
            "syntax", "the expression is nested too deeply to compile"
        ) from None
    return Expression(source, evaluate, predicate, table)


def _function_table(functions: FunctionsArg) -> dict[str, Function]:
    if functions is None:
        return {}
    if isinstance(functions, Mapping):
        for key, function in functions.items():
            if not isinstance(function, Function) or key != function.name:
                raise ValueError(
                    f"functions[{key!r}] must be a Function named {key!r}, got {function!r}"
                )
        items: Iterable[Function] = functions.values()
    else:
        items = functions
    table: dict[str, Function] = {}
    for function in items:
        if not isinstance(function, Function):
            raise TypeError(f"expected a Function, got {function!r}")
        if function.name in BUILTINS:
            raise ValueError(f"custom function {function.name}() would shadow the built-in")
        if function.name in table and table[function.name] != function:
            raise ValueError(f"two different custom functions are named {function.name}()")
        table[function.name] = function
    return table
