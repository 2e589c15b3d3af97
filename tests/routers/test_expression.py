"""Unit tests of `busway.routers.expression`: the API around the compiled closures.

The compliance suite (test_expression_compliance.py) checks JMESPath semantics; these tests
check what busway adds: custom functions and the context they receive, compile-time rejection,
error messages that point at the expression, truthiness, and safety properties of results.
"""

from __future__ import annotations

import ast
import copy
import json
import pickle
import sys
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import jmespath
import pytest
from jmespath.exceptions import JMESPathError

from busway.routers.expression import (
    BUILTIN_FUNCTIONS,
    Expression,
    ExpressionError,
    ExpressionRuntimeError,
    ExpressionSyntaxError,
    Function,
    compile_expression,
)

ORDER: dict[str, Any] = {
    "id": "ord-7f3a",
    "status": "paid",
    "total": 149.9,
    "customer": {"name": "Alice Martin", "country": "FR", "vip": True},
    "items": [
        {"sku": "B-2", "qty": 1, "price": 49.9},
        {"sku": "A-1", "qty": 2, "price": 50.0},
    ],
    "tags": ["web", "promo"],
}


class Message:
    """A stand-in for the per-message context busway passes (subject, headers)."""

    def __init__(self, subject: str, headers: dict[str, str]) -> None:
        self.subject = subject
        self.headers = headers


def _subject(message: Message) -> str:
    return message.subject


def _header(message: Message, name: str) -> str | None:
    return message.headers.get(name)


CONTEXT_FUNCTIONS = [
    Function("subject", _subject, pass_context=True),
    Function("header", _header, min_args=1, max_args=1, pass_context=True),
]


# --- the basic API -------------------------------------------------------------------------


def test_compile_and_evaluate() -> None:
    expr = compile_expression("{id: id, customer: customer.name, items: length(items)}")
    assert isinstance(expr, Expression)
    assert expr.source == "{id: id, customer: customer.name, items: length(items)}"
    assert expr(ORDER) == {"id": "ord-7f3a", "customer": "Alice Martin", "items": 2}
    assert expr(ORDER, None) == expr(ORDER)
    assert repr(expr) == "Expression('{id: id, customer: customer.name, items: length(items)}')"


def test_predicate_value_and_truthiness() -> None:
    expr = compile_expression("total > `100` && status == 'paid' && customer.country == 'FR'")
    assert expr(ORDER) is True
    assert expr.is_truthy(ORDER) is True
    assert expr.is_truthy({**ORDER, "status": "open"}) is False
    assert expr.is_truthy({}) is False
    assert expr.is_truthy(ORDER, ctx=None) is True  # ctx may be passed by keyword


def test_builtin_names_are_published() -> None:
    assert {"length", "sort_by", "to_number", "values"} <= BUILTIN_FUNCTIONS
    assert len(BUILTIN_FUNCTIONS) == 26


@pytest.mark.parametrize(
    ("value", "truthy"),
    [
        (False, False),
        (None, False),
        ("", False),
        ([], False),
        ({}, False),
        (True, True),
        (0, True),  # numbers are always true in JMESPath, unlike Python
        (0.0, True),
        (-1, True),
        ("0", True),
        ([None], True),
        ({"a": None}, True),
    ],
)
def test_truthiness_follows_jmespath(value: Any, truthy: bool) -> None:
    assert compile_expression("@").is_truthy(value) is truthy
    assert compile_expression("!@")(value) is (not truthy)
    assert compile_expression("@ && `1`")(value) == (1 if truthy else value)
    assert compile_expression("@ || 'other'")(value) == (value if truthy else "other")
    assert compile_expression("[?@]")([value]) == ([value] if truthy else [])


@pytest.mark.parametrize(
    "source",
    [
        "total > 'a'",  # number vs string: null, not an exception
        "customer > `1`",
        "missing < `1`",
        "`true` >= `1`",
    ],
)
def test_incomparable_ordering_is_null_and_false(source: str) -> None:
    expr = compile_expression(source)
    assert expr(ORDER) is None
    assert expr.is_truthy(ORDER) is False


def test_equality_never_confuses_booleans_with_numbers() -> None:
    doc = {"one": 1, "yes": True, "ones": [1], "yeses": [True], "zero": 0, "no": False}
    assert compile_expression("one == yes")(doc) is False
    assert compile_expression("one == `true`")(doc) is False
    assert compile_expression("yes == `1`")(doc) is False
    assert compile_expression("zero == `false`")(doc) is False
    assert compile_expression("no != `0`")(doc) is True
    assert compile_expression("ones == yeses")(doc) is False  # also inside arrays
    assert compile_expression("one == `1.0`")(doc) is True
    assert compile_expression("contains(yeses, `1`)")(doc) is False
    assert compile_expression("contains(ones, `1`)")(doc) is True


def test_to_number_accepts_json_numbers_only() -> None:
    expr = compile_expression("to_number(@)")
    assert expr("12") == 12
    assert expr("-1.5e2") == -150.0
    for text in ("1_000", " 7", "inf", "nan", "0x10", "+1", "1."):
        assert expr(text) is None, text


def test_documents_may_use_dict_subclasses() -> None:
    doc = OrderedDict(a=OrderedDict(b=[1, 2, 3]))
    assert compile_expression("a.b[1]")(doc) == 2
    assert compile_expression("length(a)")(doc) == 1
    assert compile_expression("keys(a)")(doc) == ["b"]


def test_missing_structure_gives_null() -> None:
    doc = {"a": {"b": "text"}, "n": None, "list": [1]}
    for source in ("x.y.z", "a.b.c", "a.b.c.d", "n.x", "list.x", "a.b[0]", "n[0]", "x[*].y"):
        assert compile_expression(source)(doc) is None, source


# --- custom functions and the context ---------------------------------------------------------


def test_custom_functions_receive_the_context() -> None:
    message = Message("orders.eu.created", {"tenant": "acme"})
    expr = compile_expression(
        "{subject: subject(), tenant: header('tenant'), id: id}", functions=CONTEXT_FUNCTIONS
    )
    assert expr(ORDER, message) == {
        "subject": "orders.eu.created",
        "tenant": "acme",
        "id": "ord-7f3a",
    }

    predicate = compile_expression(
        "starts_with(subject(), 'orders.') && header('tenant') == 'acme'",
        functions=CONTEXT_FUNCTIONS,
    )
    assert predicate.is_truthy(ORDER, message) is True
    assert predicate.is_truthy(ORDER, ctx=Message("orders.x", {"tenant": "other"})) is False


def test_context_reaches_projections_filters_and_exprefs() -> None:
    seen: list[Any] = []

    def tag(ctx: Any, value: Any) -> Any:
        seen.append(ctx)
        return value

    functions = [Function("tag", tag, 1, 1, pass_context=True)]
    ctx = object()
    expr = compile_expression(
        "[items[?tag(qty) > `1`].sku, map(&tag(sku), items), sort_by(items, &tag(price))[0].sku]",
        functions=functions,
    )
    assert expr(ORDER, ctx) == [["A-1"], ["B-2", "A-1"], "B-2"]
    assert seen and all(item is ctx for item in seen)


def test_functions_without_context_and_variadic_functions() -> None:
    functions = {
        "double": Function("double", lambda x: x * 2, min_args=1, max_args=1),
        "first": Function(
            "first", lambda *xs: next((x for x in xs if x is not None), None), 1, None
        ),
    }
    assert compile_expression("double(total)", functions=functions)({"total": 2}) == 4
    first = compile_expression("first(a, b, c, `9`)", functions=functions)
    assert first({"b": 2}) == 2
    assert first({}) == 9


def test_custom_function_gets_exprefs_as_callables() -> None:
    def apply(ref: Any, value: Any) -> Any:
        return ref(value)

    expr = compile_expression(
        "apply(&customer.name, @)", functions=[Function("apply", apply, 2, 2)]
    )
    assert expr(ORDER) == "Alice Martin"


def test_arity_is_checked_at_compile_time() -> None:
    with pytest.raises(ExpressionSyntaxError) as caught:
        compile_expression("id == header('a', 'b')", functions=CONTEXT_FUNCTIONS)
    error = caught.value
    assert error.kind == "invalid-arity"
    assert error.position == 6
    assert error.expression == "id == header('a', 'b')"
    assert "header() takes exactly 1 argument, got 2" in str(error)

    with pytest.raises(ExpressionSyntaxError, match="at least 1 argument, got 0"):
        compile_expression("not_null()")
    with pytest.raises(ExpressionSyntaxError, match=r"subject\(\) takes exactly 0 arguments"):
        compile_expression("subject(@)", functions=CONTEXT_FUNCTIONS)


def test_unknown_functions_are_rejected_at_compile_time() -> None:
    with pytest.raises(ExpressionSyntaxError) as caught:
        compile_expression("lenght(items) > `1`")
    error = caught.value
    assert error.kind == "unknown-function"
    assert error.position == 0
    assert "(did you mean length()?)" in str(error)
    assert "; expected one of: abs, avg" in str(error)
    # busway's functions only exist where they are supplied
    with pytest.raises(ExpressionSyntaxError, match="unknown function header"):
        compile_expression("header('a')")


def test_function_definitions_are_validated() -> None:
    with pytest.raises(ValueError, match="identifier"):
        Function("bad-name", len)
    with pytest.raises(ValueError, match="max_args"):
        Function("f", len, min_args=2, max_args=1)
    with pytest.raises(ValueError, match="min_args"):
        Function("f", len, min_args=-1)
    with pytest.raises(TypeError, match="callable"):
        Function("f", "not callable")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shadow"):
        compile_expression("length(@)", functions=[Function("length", len, 1, 1)])
    with pytest.raises(ValueError, match="must be a Function named"):
        compile_expression("f()", functions={"g": Function("f", len)})
    with pytest.raises(TypeError, match="expected a Function"):
        compile_expression("f()", functions=[len])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="two different"):
        compile_expression("f()", functions=[Function("f", len), Function("f", abs)])


def test_custom_function_errors_are_located() -> None:
    def strict(value: Any) -> Any:
        if not isinstance(value, str):
            raise ExpressionRuntimeError("invalid-type", "strict() wants a string")
        return value

    expr = compile_expression("id && strict(total)", functions=[Function("strict", strict, 1, 1)])
    with pytest.raises(ExpressionRuntimeError) as caught:
        expr(ORDER)
    assert caught.value.expression == "id && strict(total)"
    assert caught.value.position == 6


def test_custom_functions_get_fresh_literal_containers() -> None:
    def mutate(values: list[int]) -> int:
        values.append(0)
        return len(values)

    expr = compile_expression("mutate(`[1, 2]`)", functions=[Function("mutate", mutate, 1, 1)])
    assert [expr(None), expr(None)] == [3, 3]


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "position", "fragment"),
    [
        ("total >", 7, "incomplete expression"),
        ("foo[?bar^baz]", 8, "unknown token ^"),
        ("a.1", 2, "unexpected 1; expected a quoted name (\"...\") or a field name or '['"),
        ("{a}", 2, "unexpected '}'; expected ':'"),
        ("foo bar", 4, "unexpected 'bar' after a complete expression; expected an operator"),
        ("a = `1`", 2, "unknown token '='; equality is written '=='"),
        ("foo[1:2:3:4]", 9, "unexpected ':' in a slice; expected [start:stop:step]"),
        (".foo", 0, "unexpected '.'; expected an expression"),
        ("`foo`", 0, "literal `foo` is not valid JSON; a string is written 'foo'"),
        ("total > `1O0`", 8, "literal `1O0` is not valid JSON"),
        ("", 0, "empty expression"),
    ],
)
def test_syntax_errors_name_expression_and_position(
    source: str, position: int, fragment: str
) -> None:
    with pytest.raises(ExpressionSyntaxError) as caught:
        compile_expression(source)
    error = caught.value
    assert error.kind == "syntax"
    assert error.expression == source
    assert error.position == position
    text = str(error)
    assert fragment in text
    assert f"at position {position} in expression {source!r}" in text
    if source:
        assert text.endswith(f"\n  {source}\n  {' ' * position}^")


def test_legacy_literals_are_rejected_even_when_jmespath_cached_them() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        jmespath.compile("`bar`")  # jmespath accepts (and caches) the deprecated form
    with pytest.raises(ExpressionSyntaxError, match="not valid JSON"):
        compile_expression("`bar`")


def test_runtime_type_errors_name_function_types_and_position() -> None:
    expr = compile_expression("status == 'paid' && length(total) > `1`")
    with pytest.raises(ExpressionRuntimeError) as caught:
        expr(ORDER)
    error = caught.value
    assert error.kind == "invalid-type"
    assert error.position == 20
    assert error.expression == "status == 'paid' && length(total) > `1`"
    assert str(error) == (
        "invalid-type: length() argument 1 must be a string, an array or an object, "
        "got number 149.9 at position 20 in expression \"status == 'paid' && length(total) > `1`\""
    )
    # the predicate form raises the same error
    with pytest.raises(ExpressionRuntimeError, match="length"):
        expr.is_truthy(ORDER)


def test_runtime_errors_keep_the_innermost_position() -> None:
    expr = compile_expression("abs(sum(tags))")
    with pytest.raises(ExpressionRuntimeError) as caught:
        expr(ORDER)
    assert caught.value.position == 4
    assert "sum() argument 1 must be an array of numbers" in str(caught.value)
    assert 'got an array containing string "web"' in str(caught.value)


@pytest.mark.parametrize(
    ("source", "kind", "fragment"),
    [
        ("length(`1`)", "invalid-type", "length() argument 1 must be a string"),
        ("join(',', `[1]`)", "invalid-type", "join() argument 2 must be an array of strings"),
        ("sort_by(items, price)", "invalid-type", "prefix the expression with &"),
        ("length(&items)", "invalid-type", "got an expression reference"),
        ("map(`1`, items)", "invalid-type", "map() argument 1 must be an expression reference"),
        ("items[::0]", "invalid-value", "slice step cannot be 0"),
    ],
)
def test_certain_type_and_value_errors_are_reported_at_compile_time(
    source: str, kind: str, fragment: str
) -> None:
    with pytest.raises(ExpressionSyntaxError) as caught:
        compile_expression(source)
    assert caught.value.kind == kind
    assert fragment in str(caught.value)


def test_errors_are_ours_not_jmespaths() -> None:
    for source in ("a[", "nope()", "length(`1`)"):
        with pytest.raises(ExpressionError) as caught:
            compile_expression(source)
        assert not isinstance(caught.value, JMESPathError)
        # no jmespath exception shows in the traceback either
        error = caught.value
        assert error.__cause__ is None
        assert error.__context__ is None or error.__suppress_context__
    with pytest.raises(ExpressionRuntimeError) as runtime:
        compile_expression("abs(id)")(ORDER)
    assert not isinstance(runtime.value, JMESPathError)


def test_errors_survive_pickling() -> None:
    with pytest.raises(ExpressionSyntaxError) as caught:
        compile_expression("abs()")
    clone = pickle.loads(pickle.dumps(caught.value))
    assert type(clone) is ExpressionSyntaxError
    assert (clone.kind, clone.expression, clone.position) == ("invalid-arity", "abs()", 0)
    assert str(clone) == str(caught.value)


def test_compile_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="must be a str"):
        compile_expression(b"a")  # type: ignore[arg-type]


# --- results and safety ---------------------------------------------------------------------


def test_container_literals_are_not_shared_between_results() -> None:
    expr = compile_expression('{tags: `["a"]`, all: to_array(`[1]`), meta: `{"k": [1]}`}')
    first = expr({})
    first["tags"].append("mutated")
    first["all"].append("mutated")
    first["meta"]["k"].append("mutated")
    assert expr({}) == {"tags": ["a"], "all": [1], "meta": {"k": [1]}}
    folded = compile_expression("sort(`[3, 1, 2]`)")
    folded(None).append(9)
    assert folded(None) == [1, 2, 3]


def test_compiled_expressions_pickle_and_copy_by_recompiling() -> None:
    expr = compile_expression("items[?qty > `1`].sku")
    for clone in (pickle.loads(pickle.dumps(expr)), copy.copy(expr), copy.deepcopy(expr)):
        assert isinstance(clone, Expression)
        assert clone.source == expr.source
        assert clone(ORDER) == ["A-1"]


def test_concurrent_evaluation_is_independent() -> None:
    expr = compile_expression("header('n')", functions=CONTEXT_FUNCTIONS)
    results: dict[int, list[Any]] = {}

    def work(number: int) -> None:
        message = Message("s", {"n": str(number)})
        results[number] = [expr(ORDER, message) for _ in range(2000)]

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(set(values) == {str(n)} for n, values in results.items())


def test_evaluation_never_uses_jmespaths_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("jmespath's interpreter was called")

    monkeypatch.setattr(jmespath.visitor.TreeInterpreter, "visit", forbidden)
    monkeypatch.setattr(jmespath.functions.Functions, "call_function", forbidden)
    for source in DIFFERENTIAL_EXPRESSIONS:
        compile_expression(source)(ORDER)


# Expressions whose results must equal jmespath.search's on every document below.
DIFFERENTIAL_EXPRESSIONS = [
    "id",
    "customer.name",
    "customer.address.city",
    "items[0].sku",
    "items[-1].price",
    "items[5]",
    "items[*].sku",
    "items[].qty",
    "items[?qty > `1`].sku",
    "items[?price >= `50` || qty == `1`].sku | [0]",
    "items[:1]",
    "items[::-1].sku",
    "customer.*",
    "*.name",
    "[id, status, customer.vip]",
    "{id: id, total: total, n: length(items), first: items[0].sku}",
    "{a: id, b: missing, c: customer.{n: name, c: country}}",
    "total > `100` && status == 'paid'",
    "status == 'open' || customer.vip",
    "!customer.vip",
    "!(customer.vip)",
    "customer.vip == `true`",
    "tags[?@ != 'web']",
    "contains(tags, 'promo')",
    "sort_by(items, &price)[].sku",
    "max_by(items, &qty).sku",
    "min_by(items, &price).price",
    "sum(items[].qty)",
    "avg(items[].price)",
    "join('|', sort(items[].sku))",
    "map(&sku, items)",
    "keys(customer)",
    "values(customer)",
    "merge(customer, {extra: `1`})",
    "not_null(missing, customer.country)",
    "to_string(total)",
    "to_array(id)",
    "type(items)",
    "length(id)",
    "reverse(tags)",
    "starts_with(id, 'ord-')",
    "ends_with(id, 'x')",
    "floor(total)",
    "ceil(total)",
    "abs(`-3`)",
    "items[].[sku, qty]",
    "items[?contains(sku, 'A')].{s: sku, p: price}",
    "@.items | [1].sku",
    '`{"a": [1, 2]}`.a[1]',
    "items[*].missing",
    "items[].tags[]",
]

DIFFERENTIAL_DOCUMENTS = [
    ORDER,
    {**ORDER, "items": [], "tags": [], "customer": {"name": "B", "country": "DE", "vip": False}},
    {**ORDER, "items": [{"sku": "Z", "qty": 3, "price": 1, "tags": ["x"]}]},
]


@pytest.mark.parametrize("source", DIFFERENTIAL_EXPRESSIONS)
def test_same_results_as_jmespath(source: str) -> None:
    compiled = compile_expression(source)
    for doc in DIFFERENTIAL_DOCUMENTS:
        expected = jmespath.search(source, doc)
        actual = compiled(doc)
        assert json.dumps(actual, sort_keys=True) == json.dumps(expected, sort_keys=True), doc


# --- packaging constraints -------------------------------------------------------------------


def test_package_imports_only_stdlib_and_jmespath() -> None:
    """Pure and testable without a broker: no NATS, no busway outside busway.routers."""
    package = Path(__file__).resolve().parents[2] / "routers" / "expression"
    allowed = set(sys.stdlib_module_names) | {"jmespath"}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                roots = {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = {(node.module or "").split(".")[0]}
            else:
                continue
            assert roots <= allowed, f"{path.name} imports {roots - allowed}"


def test_expressions_are_immutable() -> None:
    expr = compile_expression("id")
    with pytest.raises(AttributeError, match="immutable"):
        expr.source = "other"
    with pytest.raises(AttributeError, match="immutable"):
        expr.is_truthy = lambda doc, ctx=None: True
    assert expr.source == "id"


def test_expression_references_may_be_computed() -> None:
    """jmespath accepts an `&expr` that is itself the result of an expression; so do we."""
    source = "sort_by(items, [&price][0])[].sku"
    assert compile_expression(source)(ORDER) == jmespath.search(source, ORDER) == ["B-2", "A-1"]
    with pytest.raises(ExpressionRuntimeError, match="must be an expression reference"):
        compile_expression("sort_by(items, @)")(ORDER)
