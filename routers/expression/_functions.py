"""JMESPath built-in functions, and the description of caller-supplied ones.

Built-ins are plain Python functions over *already evaluated* arguments. The compiler wraps each
call site in a closure that evaluates the arguments, checks their top-level types against the
declared `Param.types` (a frozenset membership test, no string dispatch) and calls the function;
element-level checks ("array of numbers") happen inside the functions, which iterate anyway.
Keeping the signature declarative gives the compiler what it needs to check arity and literal
arguments at compile time, and gives error messages their "expected ..." wording.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Any, Final, Protocol

from ._errors import ExpressionRuntimeError, describe_value, type_name

__all__ = [
    "BUILTINS",
    "Builtin",
    "Evaluator",
    "ExpRef",
    "Function",
    "Param",
    "Predicate",
    "json_equal",
]


class Evaluator(Protocol):
    """A compiled expression node: `(current value, ctx=None) -> JMESPath value`.

    Declared here, beside `ExpRef` which carries one, and shared with the compiler.
    """

    def __call__(self, value: Any, /, ctx: Any = None) -> Any:
        """Evaluate against `value`, passing `ctx` down to custom functions."""
        ...


class Predicate(Protocol):
    """A compiled node in boolean position: `(current value, ctx=None) -> truthiness`."""

    def __call__(self, value: Any, /, ctx: Any = None) -> bool:
        """Whether the node's value for `value` is JMESPath-true."""
        ...


_NUMBER: Final[frozenset[type]] = frozenset({int, float})
_STRING: Final[frozenset[type]] = frozenset({str})
_NOTHING: Final[frozenset[type]] = frozenset()
_IDENTIFIER: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# JSON's number grammar: to_number() must not accept Python-isms such as "1_000", " 7", "inf".
_JSON_NUMBER: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?P<frac>\.[0-9]+)?(?P<exp>[eE][+-]?[0-9]+)?")


class ExpRef:
    """The value of `&expr`: a compiled expression bound to the evaluation context.

    Built-ins such as `sort_by` unpack `evaluate` and `ctx` directly; custom functions may
    simply call the object with an element.
    """

    __slots__ = ("ctx", "evaluate")
    _is_expref: Final = True

    def __init__(self, evaluate: Evaluator, ctx: Any) -> None:
        self.evaluate = evaluate
        self.ctx = ctx

    def __call__(self, value: Any) -> Any:
        """Evaluate the referenced expression against `value`."""
        return self.evaluate(value, self.ctx)

    def __repr__(self) -> str:
        return "<expref>"


@dataclass(frozen=True, slots=True)
class Function:
    """An extra function made available to expressions, e.g. busway's `header('name')`.

    Why this shape: arity is checked when the expression is compiled (a route with
    `header()` must fail at start-up, not on the first message), and `pass_context` lets a
    function read per-message state (subject, headers) that is not part of the JSON document,
    without global variables: the object given as `expr(doc, ctx)` is passed as the first
    argument. Arguments arrive evaluated (an `&expr` argument arrives as a callable taking one
    value); no type checking is done for custom functions, they may raise
    `ExpressionRuntimeError` themselves. Names may not shadow built-ins.

    `max_args=None` makes the function variadic (at least `min_args` arguments). Example:

        Function("header", lambda message, name: message.headers.get(name),
                 min_args=1, max_args=1, pass_context=True)
    """

    name: str
    func: Callable[..., Any]
    min_args: int = 0
    max_args: int | None = 0
    pass_context: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or _IDENTIFIER.fullmatch(self.name) is None:
            raise ValueError(f"function name must be a JMESPath identifier, got {self.name!r}")
        if not callable(self.func):
            raise TypeError(f"function {self.name!r}: func must be callable, got {self.func!r}")
        if self.min_args < 0:
            raise ValueError(f"function {self.name!r}: min_args must be >= 0")
        if self.max_args is not None and self.max_args < self.min_args:
            raise ValueError(
                f"function {self.name!r}: max_args ({self.max_args}) < min_args "
                f"({self.min_args}); use max_args=None for a variadic function"
            )

    def accepts(self, count: int) -> bool:
        """Whether a call with `count` arguments has the right arity."""
        return count >= self.min_args and (self.max_args is None or count <= self.max_args)

    def arity_text(self) -> str:
        """Human wording of the arity, for error messages ("exactly 1 argument", ...)."""
        return _arity_text(self.min_args, self.max_args)


def _arity_text(low: int, high: int | None) -> str:
    plural = "" if (high if high is not None else low) == 1 else "s"
    if high is None:
        return f"at least {low} argument{plural}"
    if high == low:
        return f"exactly {low} argument{plural}"
    return f"{low} to {high} arguments"


@dataclass(frozen=True, slots=True)
class Param:
    """One declared parameter of a built-in.

    `types` holds the accepted Python types (exact match: the fast path is one frozenset
    lookup); `None` accepts anything. `label` is the JMESPath wording used in messages.
    """

    label: str
    types: frozenset[type] | None

    def accepts(self, value: Any) -> bool:
        """Exact-type check first; subclasses (say an OrderedDict document) are accepted too."""
        types = self.types
        if types is None or type(value) in types:
            return True
        return any(isinstance(value, t) and not _is_bool_as_number(value, t) for t in types)

    def error(self, function: str, index: int, value: Any) -> ExpressionRuntimeError:
        """The `invalid-type` error for `value`, naming the function, expected and actual type."""
        return ExpressionRuntimeError(
            "invalid-type",
            f"{function}() argument {index + 1} must be {self.label}, got {describe_value(value)}",
        )


def _is_bool_as_number(value: Any, t: type) -> bool:
    # bool is a subclass of int in Python, but not a number in JMESPath.
    return isinstance(value, bool) and t is not bool


_ANY: Final = Param("any value", None)
_NUMBER_P: Final = Param("a number", _NUMBER)
_STRING_P: Final = Param("a string", frozenset({str}))
_ARRAY_P: Final = Param("an array", frozenset({list}))
_OBJECT_P: Final = Param("an object", frozenset({dict}))
_EXPREF_P: Final = Param("an expression reference (&expr)", frozenset({ExpRef}))
_ARRAY_OR_STRING: Final = Param("an array or a string", frozenset({list, str}))
_SIZED: Final = Param("a string, an array or an object", frozenset({str, list, dict}))
_NUMBERS: Final = Param("an array of numbers", frozenset({list}))
_STRINGS: Final = Param("an array of strings", frozenset({list}))
_SORTABLE: Final = Param("an array of numbers or an array of strings", frozenset({list}))


@dataclass(frozen=True, slots=True)
class Builtin:
    """A built-in function: implementation plus declared signature.

    `variadic` repeats the last parameter. `leaks` says the result may contain (parts of) an
    argument: the compiler then gives such a function fresh copies of container literals so
    that a caller mutating a result cannot corrupt the compiled expression's constants.

    `expref_at` is the index of the `&expr` parameter of map/sort_by/min_by/max_by. Those are
    called as `impl(array, evaluate, ctx)`: the call site passes the referenced expression's
    closure and the context directly, so no `ExpRef` object is built per call.
    """

    name: str
    impl: Callable[..., Any]
    params: tuple[Param, ...]
    variadic: bool = False
    leaks: bool = False
    expref_at: int | None = None

    @property
    def min_args(self) -> int:
        """Fewest arguments accepted."""
        return len(self.params)

    @property
    def max_args(self) -> int | None:
        """Most arguments accepted; `None` when variadic."""
        return None if self.variadic else len(self.params)

    def accepts(self, count: int) -> bool:
        """Whether a call with `count` arguments has the right arity."""
        return count == len(self.params) or (self.variadic and count >= len(self.params))

    def arity_text(self) -> str:
        """Human wording of the arity, for error messages."""
        return _arity_text(self.min_args, self.max_args)

    def param(self, index: int) -> Param:
        """The declared parameter at `index` (the last one repeats when variadic)."""
        return self.params[min(index, len(self.params) - 1)]


# --- equality -------------------------------------------------------------------------------


def json_equal(left: Any, right: Any) -> bool:
    """JMESPath equality: deep, and `true` never equals `1` (Python says `True == 1`)."""
    if left.__class__ is bool or right.__class__ is bool:
        return left is right
    if isinstance(left, list):
        return (
            isinstance(right, list)
            and len(left) == len(right)
            and all(json_equal(a, b) for a, b in zip(left, right, strict=True))
        )
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and left.keys() == right.keys()
            and all(json_equal(value, right[key]) for key, value in left.items())
        )
    if isinstance(right, list | dict):
        return False
    return bool(left == right)


# --- element checks -------------------------------------------------------------------------


def _element_error(
    function: str, expected: str, element: Any, argument: int = 1
) -> ExpressionRuntimeError:
    return ExpressionRuntimeError(
        "invalid-type",
        f"{function}() argument {argument} must be {expected}, got an array containing "
        f"{describe_value(element)}",
    )


def _require_sortable(function: str, values: list[Any]) -> None:
    """All numbers or all strings, decided by the first element (as the spec says)."""
    if not values:
        return
    first = values[0].__class__
    if first is str:
        expected, wanted = "an array of strings", _STRING
    elif first in _NUMBER:
        expected, wanted = "an array of numbers", _NUMBER
    else:
        expected, wanted = "an array of numbers or an array of strings", _NOTHING
    for element in values:
        if element.__class__ not in wanted:
            raise _element_error(function, expected, element)


def _key_types(function: str, key: Any) -> frozenset[type]:
    """The type every `&expr` key must share with the first one: numbers or strings."""
    if key.__class__ is str:
        return _STRING
    if key.__class__ in _NUMBER:
        return _NUMBER
    raise _key_error(function, key)


def _key_error(function: str, key: Any) -> ExpressionRuntimeError:
    return ExpressionRuntimeError(
        "invalid-type",
        f"{function}() expression must give a number or a string for every element "
        f"(all of the same type), got {describe_value(key)}",
    )


def _sort_keys(function: str, array: list[Any], evaluate: Evaluator, ctx: Any) -> list[Any]:
    """Evaluate the `&expr` on each element; keys must be all numbers or all strings."""
    keys = []
    for element in array:
        keys.append(evaluate(element, ctx))
    if keys:
        wanted = _key_types(function, keys[0])
        for key in keys:
            if key.__class__ not in wanted:
                raise _key_error(function, key)
    return keys


# --- the built-ins --------------------------------------------------------------------------
# Where the call site's top-level type check is all a function needs, the implementation is a
# C callable (len, abs, math.ceil, str.startswith, ...): no Python frame at all per call.


def _avg(numbers: list[Any]) -> float | None:
    for element in numbers:
        if element.__class__ not in _NUMBER:
            raise _element_error("avg", "an array of numbers", element)
    return sum(numbers) / len(numbers) if numbers else None


def _contains(subject: list[Any] | str, search: Any) -> bool:
    if isinstance(subject, str):
        return isinstance(search, str) and search in subject
    if search.__class__ is str or search is None:
        return search in subject  # == on str/None cannot confuse true with 1
    return any(json_equal(element, search) for element in subject)


def _join(separator: str, strings: list[Any]) -> str:
    for element in strings:
        if element.__class__ is not str:
            raise _element_error("join", "an array of strings", element, argument=2)
    return separator.join(strings)


def _values(obj: dict[str, Any]) -> list[Any]:
    return list(obj.values())


def _map(array: list[Any], evaluate: Evaluator, ctx: Any) -> list[Any]:
    mapped = []
    for element in array:
        mapped.append(evaluate(element, ctx))
    return mapped


def _max(values: list[Any]) -> Any:
    _require_sortable("max", values)
    return max(values) if values else None


def _min(values: list[Any]) -> Any:
    _require_sortable("min", values)
    return min(values) if values else None


def _best_by(
    function: str,
    array: list[Any],
    evaluate: Evaluator,
    ctx: Any,
    *,
    better: Callable[[Any, Any], bool],
) -> Any:
    """max_by/min_by in one pass, keeping the first element whose key is `better` than all
    before it (so ties go to the earliest element, like Python's max/min)."""
    if not array:
        return None
    best = array[0]
    best_key = evaluate(best, ctx)
    wanted = _key_types(function, best_key)
    for element in array[1:]:
        key = evaluate(element, ctx)
        if key.__class__ not in wanted:
            raise _key_error(function, key)
        if better(key, best_key):
            best, best_key = element, key
    return best


def _merge(*objects: dict[str, Any]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for obj in objects:
        merged.update(obj)
    return merged


def _not_null(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _sort(values: list[Any]) -> list[Any]:
    if values:
        wanted = _STRING if values[0].__class__ is str else _NUMBER
        for element in values:
            if element.__class__ not in wanted:
                _require_sortable("sort", values)  # raises, with the right wording
    return sorted(values)


def _sort_by(array: list[Any], evaluate: Evaluator, ctx: Any) -> list[Any]:
    keys = _sort_keys("sort_by", array, evaluate, ctx)
    order = sorted(range(len(keys)), key=keys.__getitem__)  # sorted() is stable, as required
    return [array[i] for i in order]


def _sum(numbers: list[float]) -> float:
    for element in numbers:
        if element.__class__ not in _NUMBER:
            raise _element_error("sum", "an array of numbers", element)
    return sum(numbers)


def _to_array(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _to_number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    match = _JSON_NUMBER.fullmatch(value)
    if match is None:
        return None
    if match["frac"] is None and match["exp"] is None:
        return int(value)
    return float(value)


def _to_string(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=str)


def _type(value: Any) -> str:
    name = type_name(value)
    if name.startswith("Python "):
        raise ExpressionRuntimeError(
            "invalid-type", f"type() argument 1 must be a JSON value, got {name}"
        )
    return name


def _builtins(*functions: Builtin) -> Mapping[str, Builtin]:
    return MappingProxyType({function.name: function for function in functions})


#: Name -> built-in (read-only). Custom functions are looked up after these and may not shadow them.
BUILTINS: Final = _builtins(
    Builtin("abs", abs, (_NUMBER_P,)),
    Builtin("avg", _avg, (_NUMBERS,)),
    Builtin("ceil", math.ceil, (_NUMBER_P,)),
    Builtin("contains", _contains, (_ARRAY_OR_STRING, _ANY)),
    Builtin("ends_with", str.endswith, (_STRING_P, _STRING_P)),
    Builtin("floor", math.floor, (_NUMBER_P,)),
    Builtin("join", _join, (_STRING_P, _STRINGS)),
    Builtin("keys", list, (_OBJECT_P,)),
    Builtin("length", len, (_SIZED,)),
    Builtin("map", _map, (_EXPREF_P, _ARRAY_P), leaks=True, expref_at=0),
    Builtin("max", _max, (_SORTABLE,)),
    Builtin(
        "max_by",
        partial(_best_by, "max_by", better=operator.gt),
        (_ARRAY_P, _EXPREF_P),
        leaks=True,
        expref_at=1,
    ),
    Builtin("merge", _merge, (_OBJECT_P,), variadic=True, leaks=True),
    Builtin("min", _min, (_SORTABLE,)),
    Builtin(
        "min_by",
        partial(_best_by, "min_by", better=operator.lt),
        (_ARRAY_P, _EXPREF_P),
        leaks=True,
        expref_at=1,
    ),
    Builtin("not_null", _not_null, (_ANY,), variadic=True, leaks=True),
    Builtin("reverse", operator.itemgetter(slice(None, None, -1)), (_ARRAY_OR_STRING,), leaks=True),
    Builtin("sort", _sort, (_SORTABLE,)),  # a new list of strings or numbers: nothing shared
    Builtin("sort_by", _sort_by, (_ARRAY_P, _EXPREF_P), leaks=True, expref_at=1),
    Builtin("starts_with", str.startswith, (_STRING_P, _STRING_P)),
    Builtin("sum", _sum, (_NUMBERS,)),
    Builtin("to_array", _to_array, (_ANY,), leaks=True),
    Builtin("to_number", _to_number, (_ANY,)),
    Builtin("to_string", _to_string, (_ANY,)),
    Builtin("type", _type, (_ANY,)),
    Builtin("values", _values, (_OBJECT_P,), leaks=True),
)
