"""Compiled expressions vs jmespath's interpreter, on a fixed set of routing expressions.

Why: `busway.routers.expression` exists to be faster than `jmespath.search` (the goal is at
least 10x on the median); this file measures that claim on the shapes routes use: a
three-clause predicate, a field mapping, a filter projection, and function-heavy ones, all on
one ~250-byte order document.

    pytest benches/bench_expressions.py --benchmark-only          # pytest-benchmark tables
    python benches/bench_expressions.py                           # timeit, median speedups

With pytest-benchmark each expression is one group, holding the compiled closure, its
`is_truthy` form, `jmespath.search(expr, doc)` and `jmespath.compile(expr).search(doc)`, so
the table's relative column shows the ratio directly.
"""

from __future__ import annotations

import json
import statistics
import sys
import timeit
from collections.abc import Callable
from typing import Any

import jmespath
import pytest

from busway.routers.expression import compile_expression

DOC: dict[str, Any] = {
    "id": "ord-7f3a",
    "status": "paid",
    "total": 149.9,
    "currency": "EUR",
    "customer": {"name": "Alice Martin", "country": "FR", "vip": True},
    "items": [
        {"sku": "B-2", "qty": 1, "price": 49.9},
        {"sku": "A-1", "qty": 2, "price": 50.0},
    ],
    "tags": ["web", "promo"],
}

EXPRESSIONS: dict[str, str] = {
    "predicate": "total > `100` && status == 'paid' && customer.country == 'FR'",
    "mapping": "{id: id, total: total, customer: customer.name, items: length(items)}",
    "filter": "items[?qty > `1`].sku",
    "functions": (
        "{skus: join(',', sort(items[].sku)), top: max_by(items, &price).sku, "
        "units: sum(items[].qty), promo: contains(tags, 'promo')}"
    ),
    "function_predicate": (
        "starts_with(id, 'ord-') && contains(tags, 'promo') && length(items) >= `2`"
    ),
}


def _runners(source: str) -> dict[str, tuple[Callable[..., Any], tuple[Any, ...]]]:
    """The contenders for one expression: (callable, arguments), called directly so that no
    wrapper lambda is timed along with the contender."""
    compiled = compile_expression(source)
    return {
        "compiled": (compiled, (DOC,)),
        "compiled.is_truthy": (compiled.is_truthy, (DOC,)),
        "jmespath.search": (jmespath.search, (source, DOC)),
        "jmespath.compile.search": (jmespath.compile(source).search, (DOC,)),
    }


def _check_agreement(source: str) -> None:
    """A benchmark of a wrong answer is worthless: compiled must equal jmespath first."""
    expected = jmespath.search(source, DOC)
    actual = compile_expression(source)(DOC)
    assert actual == expected, f"{source!r}: compiled {actual!r} != jmespath {expected!r}"


# --- pytest-benchmark ---------------------------------------------------------------------


@pytest.mark.parametrize("contender", list(_runners("@")))
@pytest.mark.parametrize("name", list(EXPRESSIONS))
def test_expression(benchmark: Any, name: str, contender: str) -> None:
    source = EXPRESSIONS[name]
    _check_agreement(source)
    benchmark.group = f"{name}: {source}"
    benchmark.extra_info["expression"] = source
    function, args = _runners(source)[contender]
    benchmark(function, *args)


# --- script mode ----------------------------------------------------------------------------


def _median_ns(
    function: Callable[..., Any], args: tuple[Any, ...], *, repeat: int, number: int
) -> float:
    timings = timeit.repeat(
        "function(*args)",
        globals={"function": function, "args": args},
        repeat=repeat,
        number=number,
    )
    return statistics.median(timings) / number * 1e9


def main(repeat: int = 15, number: int = 20_000) -> int:
    """Time every contender in this process; print medians and the speedup over jmespath."""
    print(f"document: {len(json.dumps(DOC))} bytes, median of {repeat} x {number} calls")
    header = f"{'expression':20} {'compiled':>10} {'is_truthy':>10} {'search':>10} {'compile':>10}"
    print(header + f" {'vs search':>10} {'vs compile':>10}")
    for name, source in EXPRESSIONS.items():
        _check_agreement(source)
        runners = _runners(source)
        medians = {
            contender: _median_ns(
                function,
                args,
                repeat=repeat,
                number=number if contender.startswith("compiled") else number // 10,
            )
            for contender, (function, args) in runners.items()
        }
        compiled = medians["compiled"]
        print(
            f"{name:20} {compiled:8.0f}ns {medians['compiled.is_truthy']:8.0f}ns "
            f"{medians['jmespath.search']:8.0f}ns {medians['jmespath.compile.search']:8.0f}ns "
            f"{medians['jmespath.search'] / compiled:9.1f}x "
            f"{medians['jmespath.compile.search'] / compiled:9.1f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
