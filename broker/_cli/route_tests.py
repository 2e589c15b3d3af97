"""`busway test`: route unit tests from a TOML file, run on the compiled routes, no broker.

    config = "busway.toml"            # relative to the test file

    [[cases]]
    name = "big orders go to orders.big"
    route = "big-orders"
    body = { id = 1, total = 500, customer = { name = "Ada" } }
    expect = [{ subject = "orders.big", body = { id = 1, total = 500, customer = "Ada" } }]

A case gives one input (`body` or `raw`, with optional `subject` and `headers`) or several
(`inputs = [...]`, for aggregates), and expects either outputs (`expect`, in order; `[]` means
filtered; expected headers must be present, others are ignored) or a dead letter
(`dead_letter = "<reason>"`). `replies = { "<subject>" = <answer> }` answers `enrich` requests.
Open aggregate groups with a `timeout` complete at the end of the case, as the timeout would.
"""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import msgspec
import orjson

from busway._config.model import Config
from busway._errors import ConfigError
from busway.routers.context import MessageContext
from busway.routers.pipeline import OUT, REPLY, TAP, Output, RoutingError
from busway.routers.route import Route

__all__ = ["CaseResult", "config_path_of", "load_cases", "run_cases"]

_KINDS = {OUT: "out", TAP: "wiretap", REPLY: "reply"}


class _Strict(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class TestInput(_Strict, frozen=True, kw_only=True):
    """One input message of a case."""

    body: Any = msgspec.UNSET
    raw: str | None = None
    subject: str | None = None
    headers: dict[str, str] = {}


class ExpectedOutput(_Strict, frozen=True, kw_only=True):
    """One output a case expects, in order."""

    subject: str
    body: Any = msgspec.UNSET
    headers: dict[str, str] = {}
    kind: Literal["out", "wiretap", "reply"] = "out"


class TestCase(TestInput, frozen=True, kw_only=True):
    """A named case: input(s), and the outputs or the dead letter they must produce."""

    name: str
    route: str
    inputs: list[TestInput] = []
    expect: list[ExpectedOutput] | None = None
    dead_letter: str | None = None
    replies: dict[str, Any] = {}


class TestFile(_Strict, frozen=True, kw_only=True):
    """A `busway test` file: which config, which cases."""

    config: str
    cases: list[TestCase]


@dataclass(slots=True, frozen=True)
class CaseResult:
    """The outcome of one case: passed, or why not (a readable explanation with a diff)."""

    name: str
    passed: bool
    detail: str = ""


def load_cases(path: str) -> TestFile:
    """Decode a test file; ConfigError names the key that is wrong."""
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
        cases = msgspec.convert(raw, TestFile)
    except OSError as exc:
        raise ConfigError(f"cannot read the test file: {exc.strerror}", file=path) from None
    except (ValueError, tomllib.TOMLDecodeError, msgspec.ValidationError) as exc:
        raise ConfigError(str(exc), file=path) from None
    for index, case in enumerate(cases.cases):
        if (case.expect is None) == (case.dead_letter is None):
            raise ConfigError(
                f"case {case.name!r} needs exactly one of `expect` or `dead_letter`",
                file=path,
                path=f"$.cases[{index}]",
            )
        if not case.inputs and case.body is msgspec.UNSET and case.raw is None:
            raise ConfigError(
                f"case {case.name!r} has no input: give `body`, `raw` or `inputs`",
                file=path,
                path=f"$.cases[{index}]",
            )
    return cases


async def run_cases(cases: TestFile, config: Config, routes: dict[str, Route]) -> list[CaseResult]:
    """Run every case against the compiled `routes` of `config`."""
    results = []
    for case in cases.cases:
        route = routes.get(case.route)
        if route is None:
            known = ", ".join(sorted(routes)) or "none"
            results.append(
                CaseResult(case.name, False, f"no route {case.route!r} (routes: {known})")
            )
            continue
        default_subject = next(r.from_ for r in config.routes if r.name == case.route)
        results.append(await _run_case(case, route, default_subject))
    return results


class _Services:
    """`RouteServices` for tests: canned answers, dedupe keys in memory."""

    def __init__(self, replies: dict[str, Any]) -> None:
        self._replies = replies
        self._seen: dict[tuple[str, str], str] = {}

    async def request(
        self, subject: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> bytes:
        if subject not in self._replies:
            raise TimeoutError
        return orjson.dumps(self._replies[subject])

    async def claim(self, scope: str, key: str, owner: str, window: float) -> bool:
        return self._seen.setdefault((scope, key), owner) == owner


async def _run_case(case: TestCase, route: Route, default_subject: str) -> CaseResult:
    services = _Services(case.replies)
    inputs = case.inputs or [case]
    outputs: list[Output] = []
    groups: dict[str, list[Any]] = {}
    try:
        for index, given in enumerate(inputs):
            data = given.raw.encode() if given.raw is not None else orjson.dumps(given.body)
            context = MessageContext(
                given.subject or default_subject, given.headers, "TEST", index + 1, 1
            )
            if route.aggregation is not None:
                outputs += await _aggregate(route, data, context, services, groups)
            elif route.is_async:
                outputs += await route.process_async(data, context, services)
            else:
                outputs += route.process(data, context)
        if route.aggregation is not None and route.aggregation.timeout is not None:
            for key in list(groups):
                outputs += await route.finish(key, groups.pop(key), services)
    except RoutingError as exc:
        if case.dead_letter is None:
            return CaseResult(case.name, False, f"dead-lettered ({exc.kind}): {exc}")
        if exc.kind != case.dead_letter:
            return CaseResult(
                case.name,
                False,
                f"dead-lettered as {exc.kind!r}, expected {case.dead_letter!r}: {exc}",
            )
        return CaseResult(case.name, True)
    if case.dead_letter is not None:
        return CaseResult(
            case.name,
            False,
            f"expected a dead letter ({case.dead_letter}), got {len(outputs)} output(s)",
        )
    assert case.expect is not None
    return _compare(case.name, case.expect, outputs)


async def _aggregate(
    route: Route,
    data: bytes,
    context: MessageContext,
    services: _Services,
    groups: dict[str, list[Any]],
) -> list[Output]:
    assert route.aggregation is not None
    pairs, outputs = await route.collect(data, context, services)
    for key, body in pairs:
        group = groups.setdefault(key, [])
        group.append(body)
        if route.aggregation.is_complete(route.aggregation.group(key, group)):
            outputs += await route.finish(key, groups.pop(key), services)
    return outputs


def _compare(name: str, expected: list[ExpectedOutput], outputs: list[Output]) -> CaseResult:
    want = [_expected_view(e) for e in expected]
    got = [
        _actual_view(output, expected[i] if i < len(expected) else None)
        for i, output in enumerate(outputs)
    ]
    if want == got:
        return CaseResult(name, True)
    diff = difflib.unified_diff(
        _pretty(want), _pretty(got), fromfile="expected", tofile="actual", lineterm=""
    )
    return CaseResult(name, False, "outputs differ:\n" + "\n".join(diff))


def _expected_view(expected: ExpectedOutput) -> dict[str, Any]:
    view: dict[str, Any] = {"kind": expected.kind, "subject": expected.subject}
    if expected.body is not msgspec.UNSET:
        view["body"] = expected.body
    if expected.headers:
        view["headers"] = expected.headers
    return view


def _actual_view(output: Output, expected: ExpectedOutput | None) -> dict[str, Any]:
    view: dict[str, Any] = {"kind": _KINDS[output.kind], "subject": output.subject}
    if expected is None or expected.body is not msgspec.UNSET:
        try:
            view["body"] = orjson.loads(output.body)
        except orjson.JSONDecodeError:
            view["body"] = output.body.decode(errors="replace")
    if expected is not None and expected.headers:
        headers = output.headers or {}
        view["headers"] = {k: headers[k] for k in expected.headers if k in headers}
    return view


def _pretty(views: list[dict[str, Any]]) -> list[str]:
    return (
        orjson.dumps(views, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode().splitlines()
    )


def config_path_of(test_file: str, cases: TestFile) -> str:
    """The config file a test file names, relative to the test file's directory."""
    return str(Path(test_file).resolve().parent / cases.config)
