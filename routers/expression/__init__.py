"""JMESPath expressions compiled to Python closures, for route predicates and mappings.

    expr = compile_expression("total > `100` && status == 'paid'")
    expr(doc)              # the value (JMESPath semantics)
    expr.is_truthy(doc)    # the value's JMESPath truthiness, as a bool: for `when =` predicates

Why compile: a router evaluates the same few expressions against every message. jmespath's
interpreter re-walks the AST each time; here the syntax is parsed by jmespath's parser once,
then each AST node becomes a closure that has captured its constants, so evaluating is a
handful of direct Python calls (more than 10x faster, see benches/bench_expressions.py).

All errors are `ExpressionError`s: `ExpressionSyntaxError` from `compile_expression` (bad text,
unknown function, wrong arity: found at start-up), `ExpressionRuntimeError` from evaluation
(a function received the wrong type for this document). Nothing here depends on NATS or on the
rest of busway; the only dependency is jmespath's parser.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ._compiler import Evaluator, Predicate, compile_tree
from ._errors import ExpressionError, ExpressionRuntimeError, ExpressionSyntaxError
from ._functions import BUILTINS, Function

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
BUILTIN_FUNCTIONS: frozenset[str] = frozenset(BUILTINS)

FunctionsArg = Mapping[str, Function] | Iterable[Function] | None


class Expression:
    """A compiled JMESPath expression: call it on a document.

    Immutable and thread-safe (closures hold no per-call state), so one instance serves every
    message of a route. Build it with `compile_expression`, not directly.
    """

    __slots__ = ("_evaluate", "_predicate", "source")

    source: str
    _evaluate: Evaluator
    _predicate: Predicate

    def __init__(self, source: str, evaluate: Evaluator, predicate: Predicate) -> None:
        self.source = source
        self._evaluate = evaluate
        self._predicate = predicate

    def __call__(self, doc: Any, ctx: Any = None) -> Any:
        """Evaluate against `doc`; `ctx` is handed to custom functions declared with
        `pass_context=True` (busway passes the message, for `subject()` or `header()`).

        Raises `ExpressionRuntimeError` when a function receives a value of the wrong type.
        The result may share objects with `doc`; copy it before mutating in place.
        """
        return self._evaluate(doc, ctx)

    def is_truthy(self, doc: Any, ctx: Any = None) -> bool:
        """Whether the value is JMESPath-true: not false, null, "", [] or {} (0 *is* true).

        For predicates: it is compiled separately, so `a && b` and comparisons yield Python
        booleans directly instead of building the value and testing it afterwards.
        """
        return self._predicate(doc, ctx)

    def __repr__(self) -> str:
        return f"Expression({self.source!r})"


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
    evaluate, predicate = compile_tree(source, table)
    return Expression(source, evaluate, predicate)


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
