"""Compile a JMESPath AST into nested Python closures, once, at start-up.

Why: jmespath's interpreter walks the AST and dispatches on node-type strings for every
document (~9 µs for a three-clause predicate). Here each AST node becomes one closure
`(value, ctx) -> result` that has already captured everything it needs (child closures,
field names, literals, the comparison to perform), so evaluation is a handful of direct calls.

Shapes that dominate routing get their own closures:

* a field chain `a.b.c` is one closure doing successive `dict.get` calls;
* a comparison against a literal captures the literal and the type test to apply;
* `&&`, `||`, `!` and filter conditions have a *predicate* form returning a Python bool,
  which is what `Expression.is_truthy` and `[?...]` need;
* a call to a built-in with only literal arguments is evaluated once, here.

* projections apply a plain field inline, without a call per element;
* built-in calls check argument types with one set lookup, and the simplest built-ins are C
  callables (`len`, `abs`, `str.startswith`, ...).

Semantics follow jmespath 1.1.0's interpreter (the compliance suite is the referee), except
where the specification is stricter: equality never treats `true` as `1` (also inside arrays),
`contains()` likewise, `to_number()` only accepts JSON number syntax, comparing a number with
a string gives null instead of crashing, non-JSON literals (`` `foo` ``, deprecated by JEP-12)
are syntax errors, and only JSON objects (dicts) have fields.

What the text alone proves wrong is rejected here, at start-up, with the expression and the
position: syntax, unknown functions, arity, literal arguments of the wrong type, `&expr`
misuse, a zero slice step. Nothing falls back to jmespath's interpreter: a node type this
module does not know is a compile error.

Every closure takes the evaluation context as its second argument (default None) and passes
it down; only calls to custom functions look at it.
"""

from __future__ import annotations

import difflib
import json
import operator
from collections.abc import Callable, Iterator, Mapping
from itertools import pairwise
from typing import Any, Final, NamedTuple

from jmespath import exceptions as jmespath_exceptions
from jmespath.lexer import Lexer
from jmespath.parser import Parser

from ._errors import ExpressionError, ExpressionRuntimeError, ExpressionSyntaxError
from ._functions import (
    BUILTINS,
    Builtin,
    Evaluator,
    ExpRef,
    Function,
    Param,
    Predicate,
    json_equal,
)

__all__ = ["Evaluator", "Node", "Predicate", "Token", "compile_tree", "parse"]

#: jmespath's AST node: `{"type": str, "children": list, "value": Any}`.
Node = dict[str, Any]

_NUMBER: Final[frozenset[type]] = frozenset({int, float})
_STRING: Final[frozenset[type]] = frozenset({str})
_NOTHING: Final[frozenset[type]] = frozenset()
_VALUE_TYPES: Final[frozenset[type]] = frozenset(
    {dict, list, str, int, float, bool, type(None), ExpRef}
)
_ORDERING: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "lt": operator.lt,
    "lte": operator.le,
    "gt": operator.gt,
    "gte": operator.ge,
}
# `literal < x` is `x > literal`: lets every literal comparison put the literal on the right.
_MIRRORED: Final = {"lt": "gt", "lte": "gte", "gt": "lt", "gte": "lte", "eq": "eq", "ne": "ne"}
# Arguments that cannot be an expression reference. The specification only allows `&expr`
# directly as a function argument, so a field (`sort_by(items, price)`, a classic slip) is
# rejected even though jmespath would accept a field holding an `&expr` built elsewhere.
_NEVER_EXPREF: Final = frozenset(
    {
        "literal",
        "field",
        "comparator",
        "multi_select_list",
        "multi_select_dict",
        "projection",
        "value_projection",
        "filter_projection",
        "flatten",
        "not_expression",
    }
)


# --- parsing --------------------------------------------------------------------------------

#: A lexer token: `{"type": str, "value": Any, "start": int, "end": int}`.
Token = dict[str, Any]


class _StrictLexer(Lexer):  # type: ignore[misc]  # jmespath ships no type hints
    """jmespath's lexer, minus the deprecated "`foo` means the string foo" fallback.

    JEP-12 deprecated non-JSON literals; jmespath still accepts them with a warning. In a route
    that fallback turns a typo such as `` `1O0` `` into a string and the predicate silently
    never matches, so it is a syntax error here. Scanning the text with this lexer before
    handing it to jmespath's parser also yields the tokens used to locate function calls.
    """

    def _consume_literal(self) -> Token:
        start = self._position
        lexeme = self._consume_until("`").replace("\\`", "`")
        try:
            value = json.loads(lexeme)
        except ValueError:
            message = f"literal `{lexeme}` is not valid JSON"
            word = lexeme.strip()
            if word and all(char.isalnum() or char in " _-" for char in word):
                message += f"; a string is written '{word}' or `\"{word}\"`"
            raise jmespath_exceptions.LexerError(
                lexer_position=start, lexer_value=lexeme, message=message
            ) from None
        return {"type": "literal", "value": value, "start": start, "end": self._position}


def parse(source: str) -> tuple[Node, list[Token]]:
    """Parse with jmespath's parser; translate its errors into `ExpressionSyntaxError`."""
    if not isinstance(source, str):
        raise TypeError(f"expression must be a str, got {type(source).__name__}")
    try:
        tokens: list[Token] = list(_StrictLexer().tokenize(source))
        tree: Node = Parser().parse(source).parsed  # a new Parser: instances are not reentrant
    except jmespath_exceptions.EmptyExpressionError:
        raise ExpressionSyntaxError(
            "syntax",
            "empty expression; expected a JMESPath expression such as `total` or `a.b`",
            expression=source,
            position=0,
        ) from None
    except jmespath_exceptions.IncompleteExpressionError:
        raise ExpressionSyntaxError(
            "syntax",
            "incomplete expression: it ends where an operand or a closing bracket is expected",
            expression=source,
            position=len(source),
        ) from None
    except jmespath_exceptions.LexerError as error:
        detail = str(error.message)
        if detail == "Unknown token '='":
            detail += "; equality is written '=='"
        raise ExpressionSyntaxError(
            "syntax",
            detail[:1].lower() + detail[1:],
            expression=source,
            position=error.lexer_position,
        ) from None
    except jmespath_exceptions.ParseError as error:
        raise ExpressionSyntaxError(
            "syntax", _parse_error_detail(error), expression=source, position=error.lex_position
        ) from None
    except jmespath_exceptions.JMESPathError as error:  # defensive: any other parser complaint
        raise ExpressionSyntaxError("syntax", str(error), expression=source) from None
    return tree, tokens


# jmespath's token type names, in the words an operator editing a route would use.
_TOKEN_WORDS: Final = {
    "quoted_identifier": 'a quoted name ("...")',
    "unquoted_identifier": "a field name",
    "lbracket": "'['",
    "rbracket": "']'",
    "lbrace": "'{'",
    "rbrace": "'}'",
    "lparen": "'('",
    "rparen": "')'",
    "colon": "':'",
    "comma": "','",
    "star": "'*'",
    "number": "a number",
}


def _parse_error_detail(error: jmespath_exceptions.ParseError) -> str:
    """Reword a jmespath parse error as "what is wrong; what was expected"."""
    found = "end of expression" if error.token_type == "EOF" else repr(error.token_value)
    message: str = error.msg
    if message.startswith("Expecting:"):
        wanted = message.removeprefix("Expecting:").rsplit(", got:", 1)[0]
        names = [name.strip(" '") for name in wanted.strip(" []").split(",")]
        expected = " or ".join(_TOKEN_WORDS.get(name, name) for name in names)
        return f"unexpected {found}; expected {expected}"
    if message.startswith("Unexpected token"):
        return (
            f"unexpected {found} after a complete expression; expected an operator "
            "('.', '[', '|', '&&', '||', a comparison) or the end"
        )
    if message == "syntax error":
        return f"unexpected {found} in a slice; expected [start:stop:step]"
    if message.startswith("Quoted identifier not allowed"):
        return "a function name cannot be quoted; write name(...)"
    if message.startswith("Invalid function name"):
        return f"{found} cannot be called; a function name is a plain identifier, as in length(x)"
    return f"unexpected {found}; expected an expression (a field, literal, '@', '[', '{{', ...)"


def _source_order(node: Node) -> Iterator[Node]:
    """Nodes in the order their text appears; a filter's condition precedes its projection."""
    yield node
    children = [child for child in node.get("children", ()) if isinstance(child, dict)]
    if node["type"] == "filter_projection":
        children = [children[0], children[2], children[1]]
    for child in children:
        yield from _source_order(child)


def _function_positions(tree: Node, tokens: list[Token]) -> dict[int, int]:
    """Map `id(function node)` to the offset of its name in the source, when unambiguous.

    jmespath's AST carries no positions, so they are recovered by pairing function nodes (in
    source order) with `name (` token pairs. If that pairing is not exact (`(f)(x)` is legal)
    positions are simply left out.
    """
    calls = [node for node in _source_order(tree) if node["type"] == "function_expression"]
    if not calls:
        return {}
    names = [
        (token["value"], token["start"])
        for token, following in pairwise(tokens)
        if token["type"] == "unquoted_identifier" and following["type"] == "lparen"
    ]
    if [name for name, _ in names] != [node["value"] for node in calls]:
        return {}
    return {id(node): start for node, (_, start) in zip(calls, names, strict=True)}


# --- small shared closures ------------------------------------------------------------------


def _identity(value: Any, ctx: Any = None) -> Any:
    return value


def _constant(value: Any) -> Evaluator:
    def constant(value_: Any, ctx: Any = None) -> Any:
        return value

    return constant


def _copy_json(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy_json(element) for element in value]
    if isinstance(value, dict):
        return {key: _copy_json(element) for key, element in value.items()}
    return value


def _fresh_copy(value: Any) -> Evaluator:
    """A container constant handed out as a new copy each time: results may be mutated."""

    def fresh(value_: Any, ctx: Any = None) -> Any:
        return _copy_json(value)

    return fresh


def is_truthy(value: Any) -> bool:
    """JMESPath truthiness: false, null, "", [] and {} are false; every number is true."""
    return bool(value) or value.__class__ in _NUMBER


def _then(first: Evaluator, names: tuple[str, ...]) -> Evaluator:
    """`first` followed by field lookups, in one closure."""
    if len(names) == 1:
        (name,) = names

        def then_field(value: Any, ctx: Any = None) -> Any:
            value = first(value, ctx)
            if value.__class__ is dict:
                return value.get(name)
            return _walk(value, names)

        return then_field

    def then_fields(value: Any, ctx: Any = None) -> Any:
        return _walk(first(value, ctx), names)

    return then_fields


def _compose(first: Evaluator, second: Evaluator) -> Evaluator:
    def composed(value: Any, ctx: Any = None) -> Any:
        return second(first(value, ctx), ctx)

    return composed


# --- field access ---------------------------------------------------------------------------
# Objects are dicts (JSON documents). The fast path tests `__class__ is dict` and does a bare
# `dict.get`; anything else (null, arrays, strings, numbers, dict subclasses) goes to `_walk`.
# A `try: value.get(...) except AttributeError` would be ~20 ns quicker on hits, but a miss
# (a missing sub-object, common when one route sees several message types) would cost ~0.5 µs.


def _walk(value: Any, names: tuple[str, ...]) -> Any:
    """Slow path of field access: null unless `value` is an object (dict subclasses too)."""
    for name in names:
        if not isinstance(value, dict):
            return None
        value = value.get(name)
    return value


def _field(name: str) -> Evaluator:
    names = (name,)

    def field(value: Any, ctx: Any = None) -> Any:
        if value.__class__ is dict:
            return value.get(name)
        return _walk(value, names)

    return field


def _field_chain(names: tuple[str, ...]) -> Evaluator:
    """`a.b.c` as one closure: successive lookups, no call per step."""
    if len(names) == 1:
        return _field(names[0])
    if len(names) == 2:
        first, second = names
        rest = names[1:]

        def chain2(value: Any, ctx: Any = None) -> Any:
            if value.__class__ is dict:
                value = value.get(first)
                if value.__class__ is dict:
                    return value.get(second)
                return None if value is None else _walk(value, rest)
            return _walk(value, names)

        return chain2
    if len(names) == 3:
        first, second, third = names

        after_first, after_second = names[1:], names[2:]

        def chain3(value: Any, ctx: Any = None) -> Any:
            if value.__class__ is dict:
                value = value.get(first)
                if value.__class__ is dict:
                    value = value.get(second)
                    if value.__class__ is dict:
                        return value.get(third)
                    return None if value is None else _walk(value, after_second)
                return None if value is None else _walk(value, after_first)
            return _walk(value, names)

        return chain3

    def chain(value: Any, ctx: Any = None) -> Any:
        return _walk(value, names)

    return chain


# --- the compiler ---------------------------------------------------------------------------


class _Compiler:
    """Turns one parsed expression into closures; holds what error messages need."""

    def __init__(
        self, source: str, tree: Node, tokens: list[Token], functions: Mapping[str, Function]
    ) -> None:
        self.source = source
        self.functions = functions
        self.positions = _function_positions(tree, tokens)

    def error(self, kind: str, detail: str, node: Node | None = None) -> ExpressionSyntaxError:
        position = None if node is None else self.positions.get(id(node))
        return ExpressionSyntaxError(kind, detail, expression=self.source, position=position)

    # -- dispatch (compile time only) --

    def value(self, node: Node) -> Evaluator:
        """The closure computing `node`'s value."""
        method: Callable[[Node], Evaluator] | None = getattr(self, f"_v_{node['type']}", None)
        if method is None:
            raise self.error("syntax", f"unsupported expression construct {node['type']!r}", node)
        return method(node)

    def predicate(self, node: Node) -> Predicate:
        """The closure computing `node`'s JMESPath truthiness as a Python bool."""
        kind = node["type"]
        if kind == "comparator":
            return self._comparator(node, as_predicate=True)
        if kind == "and_expression":
            return _all(tuple(self.predicate(part) for part in _operands(node, kind)))
        if kind == "or_expression":
            return _any(tuple(self.predicate(part) for part in _operands(node, kind)))
        if kind == "not_expression":
            return _negate(self.predicate(node["children"][0]))
        if kind == "literal":
            return _constant(is_truthy(node["value"]))
        return _truthiness(self.value(node))

    # -- leaves --

    def _v_identity(self, node: Node) -> Evaluator:
        return _identity

    _v_current = _v_identity

    def _v_literal(self, node: Node) -> Evaluator:
        value = node["value"]
        return _fresh_copy(value) if isinstance(value, list | dict) else _constant(value)

    def _v_field(self, node: Node) -> Evaluator:
        return _field(node["value"])

    # -- sequences: `a.b`, `a[0]`, `a | b` all feed each step's result to the next --

    def _v_subexpression(self, node: Node) -> Evaluator:
        return self._sequence(node["children"])

    _v_index_expression = _v_subexpression
    _v_pipe = _v_subexpression

    def _sequence(self, children: list[Node]) -> Evaluator:
        """Runs of fields become one chained lookup; a run that follows another step is
        fused into that step's closure (`max_by(...).sku` is one closure, not two)."""
        steps: list[Evaluator | tuple[str, ...]] = []
        for child in children:
            if child["type"] == "field":
                if steps and isinstance(steps[-1], tuple):
                    steps[-1] += (child["value"],)
                else:
                    steps.append((child["value"],))
            elif child["type"] not in ("identity", "current"):
                steps.append(self.value(child))
        evaluator: Evaluator | None = None
        for step in steps:
            if isinstance(step, tuple):
                evaluator = _field_chain(step) if evaluator is None else _then(evaluator, step)
            else:
                evaluator = step if evaluator is None else _compose(evaluator, step)
        return _identity if evaluator is None else evaluator

    def _v_index(self, node: Node) -> Evaluator:
        return _index(node["value"])

    def _v_slice(self, node: Node) -> Evaluator:
        start, stop, step = node["children"]
        if step == 0:
            raise self.error(
                "invalid-value",
                "slice step cannot be 0; use a positive or negative step, e.g. [::1] or [::-1]",
            )
        return _slice(slice(start, stop, step))

    # -- projections --

    def _v_projection(self, node: Node) -> Evaluator:
        left, right = node["children"]
        if left["type"] == "flatten":  # `a[].b`: flatten and project in one pass
            return _flatten_projection(self.value(left["children"][0]), self._optional(right))
        return _projection(self.value(left), self._optional(right))

    def _v_value_projection(self, node: Node) -> Evaluator:
        left, right = node["children"]
        return _value_projection(self.value(left), self._optional(right))

    def _v_filter_projection(self, node: Node) -> Evaluator:
        left, right, condition = node["children"]
        base = self.value(left)
        keep = self.predicate(condition)  # before `right`: source order, for positions
        return _filter_projection(base, keep, self._optional(right))

    def _v_flatten(self, node: Node) -> Evaluator:
        return _flatten(self.value(node["children"][0]))

    def _optional(self, node: Node) -> _Each:
        """What a projection applies to each element. The identity is `(None, None)` and a
        single field `(name, None)`, which the projection loops handle inline: no call per
        element for the two commonest right-hand sides."""
        if node["type"] in ("identity", "current"):
            return _Each(None, None)
        if node["type"] == "field":
            return _Each(node["value"], None)
        return _Each(None, self.value(node))

    # -- multi-selects --

    def _v_multi_select_list(self, node: Node) -> Evaluator:
        return _multi_select_list(tuple(self.value(child) for child in node["children"]))

    def _v_multi_select_dict(self, node: Node) -> Evaluator:
        pairs = tuple((pair["value"], self.value(pair["children"][0])) for pair in node["children"])
        return _multi_select_dict(pairs)

    # -- logic --

    def _v_and_expression(self, node: Node) -> Evaluator:
        left, right = node["children"]
        return _and(self.value(left), self.value(right))

    def _v_or_expression(self, node: Node) -> Evaluator:
        left, right = node["children"]
        return _or(self.value(left), self.value(right))

    def _v_not_expression(self, node: Node) -> Evaluator:
        return _negate(self.predicate(node["children"][0]))

    # -- comparisons --

    def _v_comparator(self, node: Node) -> Evaluator:
        return self._comparator(node, as_predicate=False)

    def _comparator(self, node: Node, *, as_predicate: bool) -> Evaluator:
        """Compile `left OP right`; with a literal side, the literal is captured and the type
        test specialised. `as_predicate` turns "not comparable" (null) into False."""
        op: str = node["value"]
        left, right = node["children"]
        if left["type"] == "literal" and right["type"] == "literal":
            result = _compare_values(op, left["value"], right["value"])
            return _constant(bool(result) if as_predicate else result)
        if left["type"] == "literal":
            left, right, op = right, left, _MIRRORED[op]
        operand = self.value(left)
        if right["type"] == "literal":
            literal = right["value"]
            if op in ("eq", "ne"):
                return _equals_literal(operand, literal, negate=op == "ne")
            return _order_literal(operand, op, literal, as_predicate=as_predicate)
        other = self.value(right)
        if op in ("eq", "ne"):
            return _equals_any(operand, other, negate=op == "ne")
        return _order_any(operand, other, _ORDERING[op], as_predicate=as_predicate)

    # -- functions --

    def _v_expref(self, node: Node) -> Evaluator:
        return _expref(self.value(node["children"][0]))

    def _v_function_expression(self, node: Node) -> Evaluator:
        name: str = node["value"]
        args: list[Node] = node["children"]
        builtin = BUILTINS.get(name)
        if builtin is not None:
            return self._builtin_call(node, builtin, args)
        custom = self.functions.get(name)
        if custom is None:
            raise self.error("unknown-function", self._unknown_function_detail(name), node)
        if not custom.accepts(len(args)):
            raise self.error(
                "invalid-arity",
                f"{name}() takes {custom.arity_text()}, got {len(args)}",
                node,
            )
        evaluators = tuple(self.value(arg) for arg in args)
        position = self.positions.get(id(node))
        return _custom_call(custom, evaluators, self.source, position)

    def _unknown_function_detail(self, name: str) -> str:
        known = sorted({*BUILTINS, *self.functions})
        detail = f"unknown function {name}()"
        close = difflib.get_close_matches(name, known, n=1)
        if close:
            detail += f" (did you mean {close[0]}()?)"
        return detail + f"; expected one of: {', '.join(known)}"

    def _builtin_call(self, node: Node, builtin: Builtin, args: list[Node]) -> Evaluator:
        name = builtin.name
        if not builtin.accepts(len(args)):
            raise self.error(
                "invalid-arity", f"{name}() takes {builtin.arity_text()}, got {len(args)}", node
            )
        for index, arg in enumerate(args):
            self._check_static_argument(node, builtin, index, arg)
        if all(arg["type"] == "literal" for arg in args):
            return self._fold(node, builtin, [arg["value"] for arg in args])
        position = self.positions.get(id(node))
        if builtin.expref_at is not None:
            return self._expref_builtin_call(builtin, args, position)
        evaluators = tuple(self._argument(builtin, arg) for arg in args)
        params = tuple(builtin.param(index) for index in range(len(args)))
        return _builtin_call(builtin, evaluators, params, self.source, position)

    def _expref_builtin_call(
        self, builtin: Builtin, args: list[Node], position: int | None
    ) -> Evaluator:
        """map/sort_by/min_by/max_by: with a literal `&expr` argument (the normal case) the
        referenced closure is captured now; otherwise the argument is evaluated per call and
        must produce an expression reference."""
        ref_at = builtin.expref_at
        assert ref_at is not None
        array_at = 1 - ref_at
        array = self.value(args[array_at])
        ref_node = args[ref_at]
        if ref_node["type"] == "expref":
            inner: Evaluator | None = self.value(ref_node["children"][0])
            dynamic = None
        else:
            inner, dynamic = None, self.value(ref_node)
        return _expref_call(builtin, array, array_at, inner, dynamic, ref_at, self.source, position)

    def _check_static_argument(self, node: Node, builtin: Builtin, index: int, arg: Node) -> None:
        """Reject at compile time what would fail on every evaluation: wrong literal types,
        `&expr` where a value is expected, and a plain value where `&expr` is required."""
        param = builtin.param(index)
        wants_expref = index == builtin.expref_at
        if arg["type"] == "literal":
            if wants_expref or not param.accepts(arg["value"]):
                raise self._static_type_error(node, param.error(builtin.name, index, arg["value"]))
        elif arg["type"] == "expref":
            if param.types is not None and not wants_expref:
                raise self.error(
                    "invalid-type",
                    f"{builtin.name}() argument {index + 1} must be {param.label}, "
                    "got an expression reference (&...)",
                    node,
                )
        elif wants_expref and _never_expref(arg):
            raise self.error(
                "invalid-type",
                f"{builtin.name}() argument {index + 1} must be {param.label}; "
                "prefix the expression with &",
                node,
            )

    def _static_type_error(self, node: Node, error: ExpressionError) -> ExpressionSyntaxError:
        return self.error(error.kind, error.detail, node)

    def _fold(self, node: Node, builtin: Builtin, values: list[Any]) -> Evaluator:
        """A built-in applied to literals only: evaluate once, now."""
        try:
            result = builtin.impl(*values)
        except ExpressionRuntimeError as error:
            raise self._static_type_error(node, error) from None
        return self._v_literal({"type": "literal", "value": result, "children": []})

    def _argument(self, builtin: Builtin, arg: Node) -> Evaluator:
        """Built-ins that never return their arguments may read container literals in place."""
        if arg["type"] == "literal" and not builtin.leaks:
            return _constant(arg["value"])
        return self.value(arg)


def _never_expref(node: Node) -> bool:
    if node["type"] in _NEVER_EXPREF:
        return True
    return node["type"] == "subexpression" and all(
        child["type"] == "field" for child in node["children"]
    )


def _compare_values(op: str, left: Any, right: Any) -> bool | None:
    """Compare two known values (used to fold literal-vs-literal comparisons)."""
    if op == "eq":
        return json_equal(left, right)
    if op == "ne":
        return not json_equal(left, right)
    kinds = _comparable_kinds(right)
    if left.__class__ in kinds:
        return _ORDERING[op](left, right)
    return None


def _comparable_kinds(literal: Any) -> frozenset[type]:
    """Types a value must have to be ordered against `literal`: numbers with numbers,
    strings with strings (jmespath's extension), nothing with anything else."""
    if literal.__class__ in _NUMBER:
        return _NUMBER
    if literal.__class__ is str:
        return _STRING
    return _NOTHING


# --- closure factories ----------------------------------------------------------------------
# Each returns one closure specialised for a node shape; none inspects node types at run time.


def _truthiness(evaluate: Evaluator) -> Predicate:
    def truthy(value: Any, ctx: Any = None) -> bool:
        result = evaluate(value, ctx)
        return bool(result) or result.__class__ in _NUMBER

    return truthy


def _operands(node: Node, kind: str) -> Iterator[Node]:
    """`a && b && c` parses as `(a && b) && c`: flatten it so one closure tests all three."""
    for child in node["children"]:
        if child["type"] == kind:
            yield from _operands(child, kind)
        else:
            yield child


def _all(parts: tuple[Predicate, ...]) -> Predicate:
    """Short-circuit AND of predicates; two and three operands are spelled out (no loop)."""
    if len(parts) == 2:
        first, second = parts

        def all2(value: Any, ctx: Any = None) -> bool:
            return first(value, ctx) and second(value, ctx)

        return all2
    if len(parts) == 3:
        first, second, third = parts

        def all3(value: Any, ctx: Any = None) -> bool:
            return first(value, ctx) and second(value, ctx) and third(value, ctx)

        return all3

    def all_(value: Any, ctx: Any = None) -> bool:
        return all(part(value, ctx) for part in parts)

    return all_


def _any(parts: tuple[Predicate, ...]) -> Predicate:
    """Short-circuit OR of predicates."""
    if len(parts) == 2:
        first, second = parts

        def any2(value: Any, ctx: Any = None) -> bool:
            return first(value, ctx) or second(value, ctx)

        return any2

    def any_(value: Any, ctx: Any = None) -> bool:
        return any(part(value, ctx) for part in parts)

    return any_


def _negate(inner: Predicate) -> Predicate:
    def negate(value: Any, ctx: Any = None) -> bool:
        return not inner(value, ctx)

    return negate


def _and(left: Evaluator, right: Evaluator) -> Evaluator:
    """`a && b`: `a` if it is falsy, else `b` (values, not booleans)."""

    def and_(value: Any, ctx: Any = None) -> Any:
        result = left(value, ctx)
        if result or result.__class__ in _NUMBER:
            return right(value, ctx)
        return result

    return and_


def _or(left: Evaluator, right: Evaluator) -> Evaluator:
    """`a || b`: `a` if it is truthy, else `b`."""

    def or_(value: Any, ctx: Any = None) -> Any:
        result = left(value, ctx)
        if result or result.__class__ in _NUMBER:
            return result
        return right(value, ctx)

    return or_


def _index(position: int) -> Evaluator:
    def index(value: Any, ctx: Any = None) -> Any:
        if isinstance(value, list):
            try:
                return value[position]
            except IndexError:
                return None
        return None

    return index


def _slice(bounds: slice) -> Evaluator:
    def slice_(value: Any, ctx: Any = None) -> Any:
        return value[bounds] if isinstance(value, list) else None

    return slice_


class _Each(NamedTuple):
    """The right-hand side of a projection: a field name, an evaluator, or neither (identity)."""

    name: str | None
    evaluate: Evaluator | None


# Loops rather than comprehensions below: on CPython 3.11 a comprehension creates and calls a
# function object each time, which costs more than the whole loop for typical small arrays.
# Each loop body is the same three-way step: inline field lookup, closure call, or nothing.


def _projection(base: Evaluator, right: _Each) -> Evaluator:
    """`left[*].right`: apply `right` to every element, dropping nulls."""
    name, each = right
    names = () if name is None else (name,)

    def project(value: Any, ctx: Any = None) -> Any:
        items = base(value, ctx)
        if not isinstance(items, list):
            return None
        collected = []
        for item in items:
            if name is not None:
                item = item.get(name) if item.__class__ is dict else _walk(item, names)
            elif each is not None:
                item = each(item, ctx)
            if item is not None:
                collected.append(item)
        return collected

    return project


def _flatten_projection(base: Evaluator, right: _Each) -> Evaluator:
    """`left[].right`: flatten one level and project in a single pass; the rare nested
    array goes through `_projection` logic via `_project_nested`."""
    name, each = right
    names = () if name is None else (name,)

    def project_flat(value: Any, ctx: Any = None) -> Any:
        items = base(value, ctx)
        if not isinstance(items, list):
            return None
        collected: list[Any] = []
        for item in items:
            if isinstance(item, list):
                _project_nested(collected, item, right, ctx)
                continue
            if name is not None:
                item = item.get(name) if item.__class__ is dict else _walk(item, names)
            elif each is not None:
                item = each(item, ctx)
            if item is not None:
                collected.append(item)
        return collected

    return project_flat


def _project_nested(collected: list[Any], items: list[Any], right: _Each, ctx: Any) -> None:
    name, each = right
    for item in items:
        if name is not None:
            item = _walk(item, (name,))
        elif each is not None:
            item = each(item, ctx)
        if item is not None:
            collected.append(item)


def _value_projection(base: Evaluator, right: _Each) -> Evaluator:
    """`left.*.right`: the same over an object's values."""
    name, each = right
    names = () if name is None else (name,)

    def project_values(value: Any, ctx: Any = None) -> Any:
        obj = base(value, ctx)
        if not isinstance(obj, dict):
            return None
        collected = []
        for item in obj.values():
            if name is not None:
                item = item.get(name) if item.__class__ is dict else _walk(item, names)
            elif each is not None:
                item = each(item, ctx)
            if item is not None:
                collected.append(item)
        return collected

    return project_values


def _filter_projection(base: Evaluator, keep: Predicate, right: _Each) -> Evaluator:
    """`left[?condition].right`: `keep` is the condition's predicate form (a bool)."""
    name, each = right
    names = () if name is None else (name,)

    def filter_(value: Any, ctx: Any = None) -> Any:
        items = base(value, ctx)
        if not isinstance(items, list):
            return None
        collected = []
        for item in items:
            if not keep(item, ctx):
                continue
            if name is not None:
                item = item.get(name) if item.__class__ is dict else _walk(item, names)
            elif each is not None:
                item = each(item, ctx)
            if item is not None:
                collected.append(item)
        return collected

    return filter_


def _flatten(base: Evaluator) -> Evaluator:
    def flatten(value: Any, ctx: Any = None) -> Any:
        items = base(value, ctx)
        if not isinstance(items, list):
            return None
        merged: list[Any] = []
        for item in items:
            if isinstance(item, list):
                merged.extend(item)
            else:
                merged.append(item)
        return merged

    return flatten


def _multi_select_list(elements: tuple[Evaluator, ...]) -> Evaluator:
    """`[a, b]`: null on null, else the list of values; short lists are built as displays."""
    if len(elements) == 2:
        first, second = elements

        def list2(value: Any, ctx: Any = None) -> Any:
            return None if value is None else [first(value, ctx), second(value, ctx)]

        return list2

    def multi_select_list(value: Any, ctx: Any = None) -> Any:
        if value is None:
            return None
        collected = []
        for element in elements:
            collected.append(element(value, ctx))
        return collected

    return multi_select_list


def _multi_select_dict(pairs: tuple[tuple[str, Evaluator], ...]) -> Evaluator:
    """`{k: v, ...}`, the mapping workhorse. Up to four pairs are a dict display (no loop, no
    per-pair unpacking); any further pairs are added by a loop."""
    if len(pairs) == 1:
        ((k1, e1),) = pairs

        def dict1(value: Any, ctx: Any = None) -> Any:
            return None if value is None else {k1: e1(value, ctx)}

        return dict1
    if len(pairs) == 2:
        (k1, e1), (k2, e2) = pairs

        def dict2(value: Any, ctx: Any = None) -> Any:
            return None if value is None else {k1: e1(value, ctx), k2: e2(value, ctx)}

        return dict2
    if len(pairs) == 3:
        (k1, e1), (k2, e2), (k3, e3) = pairs

        def dict3(value: Any, ctx: Any = None) -> Any:
            if value is None:
                return None
            return {k1: e1(value, ctx), k2: e2(value, ctx), k3: e3(value, ctx)}

        return dict3
    (k1, e1), (k2, e2), (k3, e3), (k4, e4) = pairs[:4]
    tail = pairs[4:]

    def dict_n(value: Any, ctx: Any = None) -> Any:
        if value is None:
            return None
        result = {k1: e1(value, ctx), k2: e2(value, ctx), k3: e3(value, ctx), k4: e4(value, ctx)}
        for key, evaluate in tail:
            result[key] = evaluate(value, ctx)
        return result

    return dict_n


def _equals_literal(operand: Evaluator, literal: Any, *, negate: bool) -> Predicate:
    """`x == literal` with the comparison chosen now from the literal's type."""
    if literal is None or literal.__class__ is bool:  # singletons: identity is equality

        def same_object(value: Any, ctx: Any = None) -> bool:
            return (operand(value, ctx) is literal) is not negate

        return same_object
    if literal.__class__ is str:  # str == only matches str

        def equals_string(value: Any, ctx: Any = None) -> bool:
            return (operand(value, ctx) == literal) is not negate

        return equals_string
    if literal.__class__ in _NUMBER:

        def equals_number(value: Any, ctx: Any = None) -> bool:
            result = operand(value, ctx)
            return (result == literal and result.__class__ is not bool) is not negate

        return equals_number
    return _equals_any(operand, _constant(literal), negate=negate)


def _equals_any(left: Evaluator, right: Evaluator, *, negate: bool) -> Predicate:
    def equals(value: Any, ctx: Any = None) -> bool:
        return json_equal(left(value, ctx), right(value, ctx)) is not negate

    return equals


def _order_literal(operand: Evaluator, op: str, literal: Any, *, as_predicate: bool) -> Evaluator:
    """`x < literal` etc.: only numbers with numbers and strings with strings; otherwise null
    (or False for a predicate)."""
    compare = _ORDERING[op]
    kinds = _comparable_kinds(literal)
    missing = False if as_predicate else None

    def order(value: Any, ctx: Any = None) -> Any:
        result = operand(value, ctx)
        if result.__class__ in kinds:
            return compare(result, literal)
        return missing

    return order


def _order_any(
    left: Evaluator, right: Evaluator, compare: Callable[[Any, Any], bool], *, as_predicate: bool
) -> Evaluator:
    missing = False if as_predicate else None

    def order(value: Any, ctx: Any = None) -> Any:
        first = left(value, ctx)
        second = right(value, ctx)
        kinds = first.__class__
        if (kinds in _NUMBER and second.__class__ in _NUMBER) or (
            kinds is str and second.__class__ is str
        ):
            return compare(first, second)
        return missing

    return order


def _expref(inner: Evaluator) -> Evaluator:
    def expref(value: Any, ctx: Any = None) -> ExpRef:
        return ExpRef(inner, ctx)

    return expref


def _fast_types(param: Param) -> frozenset[type]:
    """The set for the call site's one-lookup type test; `param.accepts` handles the rest."""
    return _VALUE_TYPES if param.types is None else param.types


def _builtin_call(
    builtin: Builtin,
    args: tuple[Evaluator, ...],
    params: tuple[Param, ...],
    source: str,
    position: int | None,
) -> Evaluator:
    """The call site of a built-in: evaluate, type-check (one set lookup per argument), call.

    Errors raised here or inside the function are stamped with the expression and the call's
    position; the `try` is free when nothing is raised.
    """
    name, impl = builtin.name, builtin.impl
    if len(args) == 1:
        (arg,), (param,) = args, params
        types = _fast_types(param)

        def call1(value: Any, ctx: Any = None) -> Any:
            try:
                first = arg(value, ctx)
                if first.__class__ in types or param.accepts(first):
                    return impl(first)
                raise param.error(name, 0, first)
            except ExpressionError as error:
                error.located(source, position)
                raise

        return call1
    if len(args) == 2:
        (arg0, arg1), (param0, param1) = args, params
        types0, types1 = _fast_types(param0), _fast_types(param1)

        def call2(value: Any, ctx: Any = None) -> Any:
            try:
                first = arg0(value, ctx)
                second = arg1(value, ctx)
                if not (first.__class__ in types0 or param0.accepts(first)):
                    raise param0.error(name, 0, first)
                if not (second.__class__ in types1 or param1.accepts(second)):
                    raise param1.error(name, 1, second)
                return impl(first, second)
            except ExpressionError as error:
                error.located(source, position)
                raise

        return call2

    def call(value: Any, ctx: Any = None) -> Any:
        try:
            values = [arg(value, ctx) for arg in args]
            for index, (param, item) in enumerate(zip(params, values, strict=True)):
                if not param.accepts(item):
                    raise param.error(name, index, item)
            return impl(*values)
        except ExpressionError as error:
            error.located(source, position)
            raise

    return call


def _expref_call(
    builtin: Builtin,
    array_arg: Evaluator,
    array_at: int,
    inner: Evaluator | None,
    dynamic: Evaluator | None,
    ref_at: int,
    source: str,
    position: int | None,
) -> Evaluator:
    """The call site of a built-in taking `&expr`: `impl(array, evaluate, ctx)`."""
    name, impl = builtin.name, builtin.impl
    array_param, ref_param = builtin.param(array_at), builtin.param(ref_at)

    def call_expref(value: Any, ctx: Any = None) -> Any:
        try:
            evaluate, ref_ctx = inner, ctx
            if evaluate is None:
                assert dynamic is not None
                ref = dynamic(value, ctx)
                if ref.__class__ is not ExpRef:
                    raise ref_param.error(name, ref_at, ref)
                evaluate, ref_ctx = ref.evaluate, ref.ctx
            items = array_arg(value, ctx)
            if items.__class__ is list or isinstance(items, list):
                return impl(items, evaluate, ref_ctx)
            raise array_param.error(name, array_at, items)
        except ExpressionError as error:
            error.located(source, position)
            raise

    return call_expref


def _custom_call(
    function: Function, args: tuple[Evaluator, ...], source: str, position: int | None
) -> Evaluator:
    """The call site of a caller-supplied function; the context goes first if asked for."""
    func = function.func
    with_context = function.pass_context

    if len(args) == 0:

        def call0(value: Any, ctx: Any = None) -> Any:
            try:
                return func(ctx) if with_context else func()
            except ExpressionError as error:
                error.located(source, position)
                raise

        return call0
    if len(args) == 1:
        (arg,) = args

        def call1(value: Any, ctx: Any = None) -> Any:
            try:
                first = arg(value, ctx)
                return func(ctx, first) if with_context else func(first)
            except ExpressionError as error:
                error.located(source, position)
                raise

        return call1

    def call(value: Any, ctx: Any = None) -> Any:
        try:
            values = [arg(value, ctx) for arg in args]
            return func(ctx, *values) if with_context else func(*values)
        except ExpressionError as error:
            error.located(source, position)
            raise

    return call


# --- entry point ----------------------------------------------------------------------------


def compile_tree(source: str, functions: Mapping[str, Function]) -> tuple[Evaluator, Predicate]:
    """Parse and compile `source` into its value closure and its truthiness closure."""
    tree, tokens = parse(source)
    compiler = _Compiler(source, tree, tokens, functions)
    return compiler.value(tree), compiler.predicate(tree)
