"""Compile each `StageConfig` into a step: a closure over its compiled expressions.

Every expression is compiled here, at start-up, and a failure names the stage and field
(`stages[2].switch.cases[0].when`). At run time a step only calls closures; an expression that
fails on a message raises `RoutingError` naming its source and stage.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson

from busway.routers import crypto_stages
from busway.routers.context import CONTEXT_FUNCTIONS, MESSAGE_FUNCTIONS, MessageContext
from busway.routers.expression import (
    Expression,
    ExpressionRuntimeError,
    ExpressionSyntaxError,
    compile_expression,
)
from busway.routers.paths import PathError, parse_path
from busway.routers.pipeline import (
    REPLY,
    REPLY_TO_HEADER,
    TAP,
    Item,
    Output,
    Reject,
    RouteServices,
    RoutingError,
    Step,
    expression_error,
)
from busway.routers.redact import RedactStageError, redact
from busway.routers.stages import CryptoStage, PythonStage, RedactStage, SignatureStage, StageConfig
from busway.routers.throttle import TokenBuckets
from busway.routers.user_code import ThreadedCall, load_object
from busway.routers.validation import Validator, schema_validator, type_validator

__all__ = ["StageCompileError", "StageCompiler", "header_value", "python_timeout"]

_PURE_FUNCTIONS = CONTEXT_FUNCTIONS[len(MESSAGE_FUNCTIONS) :]

#: A `python` stage's default timeout: this, or a third of the route's `ack_wait` if less.
PYTHON_TIMEOUT = 10.0


def python_timeout(ack_wait: float | None) -> float:
    """The default timeout of a `python` stage on a route with this `ack_wait`."""
    return PYTHON_TIMEOUT if ack_wait is None else min(PYTHON_TIMEOUT, ack_wait / 3)


class StageCompileError(Exception):
    """A stage does not compile; `field` is its path within the route, e.g. `stages[1].set.a`."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def header_value(value: Any) -> str:
    """A JSON value as a header: strings as they are, anything else as compact JSON."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _evaluation_error(exc: ExpressionRuntimeError, expr: Expression, stage: str) -> RoutingError:
    return expression_error(exc, expr.source, stage)


class StageCompiler:
    """Compiles the stages of one route; remembers whether any needs the message context."""

    def __init__(
        self,
        route: str,
        resolve_path: Callable[[str], Path] = Path,
        ack_wait: float | None = None,
    ) -> None:
        self.route = route
        self.resolve_path = resolve_path
        self.ack_wait = ack_wait
        self.needs_context = False

    def expression(self, source: str, field: str) -> Expression:
        """Compile `source`; note whether it reads the message (`subject()`, `header()`...)."""
        try:
            compiled = compile_expression(source, functions=CONTEXT_FUNCTIONS)
        except ExpressionSyntaxError as exc:
            raise StageCompileError(field, str(exc)) from None
        if not self.needs_context:
            try:
                compile_expression(source, functions=_PURE_FUNCTIONS)
            except ExpressionSyntaxError:
                self.needs_context = True
        return compiled

    def compile(self, stage: StageConfig, field: str) -> Step:
        """The step for `stage`, found at `field` (`stages[3]`) in the route."""
        kind = stage.kind
        build: Callable[[Any, str], Step] = getattr(self, f"_{kind}")
        return build(getattr(stage, kind), f"{field}.{kind}")

    # -- pure stages -------------------------------------------------------------------------

    def _filter(self, source: str, field: str) -> Step:
        expr = self.expression(source, field)
        predicate = expr.is_truthy

        def filter_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output]
        ) -> list[Item]:
            try:
                return [item for item in items if predicate(item.document, ctx)]
            except ExpressionRuntimeError as exc:
                raise _evaluation_error(exc, expr, field) from None

        return filter_step, False

    def _transform(self, source: str, field: str) -> Step:
        expr = self.expression(source, field)

        def transform_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output]
        ) -> list[Item]:
            try:
                for item in items:
                    item.document = expr(item.document, ctx)
            except ExpressionRuntimeError as exc:
                raise _evaluation_error(exc, expr, field) from None
            return items

        return transform_step, False

    def _set(self, assignments: dict[str, str], field: str) -> Step:
        compiled = [
            (self._path(path, f"{field}.{path}"), self.expression(source, f"{field}.{path}"))
            for path, source in assignments.items()
        ]

        def set_step(items: list[Item], ctx: MessageContext | None, _: list[Output]) -> list[Item]:
            for item in items:
                document = item.document
                # Every value is computed from the body as it arrived at this stage, then
                # written: `set = {a = "b", b = "a"}` swaps, whatever the order of the keys.
                values = []
                for path, expr in compiled:
                    try:
                        values.append((path, expr(document, ctx)))
                    except ExpressionRuntimeError as exc:
                        raise _evaluation_error(exc, expr, field) from None
                for path, value in values:
                    try:
                        path.set(document, value)
                    except PathError as exc:
                        raise RoutingError("transform", f"{field}: {exc}", stage=field) from None
            return items

        return set_step, False

    def _remove(self, paths: list[str], field: str) -> Step:
        parsed = [self._path(path, f"{field}[{i}]") for i, path in enumerate(paths)]

        def remove_step(
            items: list[Item], _c: MessageContext | None, _o: list[Output]
        ) -> list[Item]:
            for item in items:
                for path in parsed:
                    try:
                        path.pop(item.document)
                    except PathError as exc:
                        raise RoutingError("transform", f"{field}: {exc}", stage=field) from None
            return items

        return remove_step, False

    def _rename(self, renames: dict[str, str], field: str) -> Step:
        pairs = [
            (self._path(old, f"{field}.{old}"), self._path(new, f"{field}.{old}"))
            for old, new in renames.items()
        ]

        def rename_step(
            items: list[Item], _c: MessageContext | None, _o: list[Output]
        ) -> list[Item]:
            for item in items:
                for old, new in pairs:
                    try:
                        found, value = old.pop(item.document)
                        if found:
                            new.set(item.document, value)
                    except PathError as exc:
                        raise RoutingError("transform", f"{field}: {exc}", stage=field) from None
            return items

        return rename_step, False

    def _split(self, spec: Any, field: str) -> Step:
        on_source, id_source = (
            (spec, None) if isinstance(spec, str) else (spec.on, spec.correlation_id)
        )
        on = self.expression(on_source, field)
        correlation = self.expression(id_source, f"{field}.correlation_id") if id_source else None
        if correlation is None:
            self.needs_context = True  # the default id is the input's stream and sequence

        def split_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output]
        ) -> list[Item]:
            result = []
            for item in items:
                try:
                    elements = on(item.document, ctx)
                    correlation_id = (
                        header_value(correlation(item.document, ctx))
                        if correlation is not None
                        else f"{ctx.stream}:{ctx.sequence}"
                        if ctx is not None
                        else ""
                    )
                except ExpressionRuntimeError as exc:
                    raise _evaluation_error(exc, on, field) from None
                if not isinstance(elements, list):
                    raise RoutingError(
                        "expression",
                        f"{field}: {on.source!r} gave {type(elements).__name__}, not an array",
                        expression=on.source,
                        stage=field,
                    )
                count = str(len(elements))
                for index, element in enumerate(elements):
                    result.append(
                        item.derive(
                            element,
                            {
                                "Busway-Correlation-Id": correlation_id,
                                "Busway-Split-Index": str(index),
                                "Busway-Split-Count": count,
                            },
                        )
                    )
            return result

        return split_step, False

    def _switch(self, spec: Any, field: str) -> Step:
        cases = [
            (self.expression(case.when, f"{field}.cases[{i}].when").is_truthy, tuple(case.to))
            for i, case in enumerate(spec.cases)
        ]
        sources = [case.when for case in spec.cases]
        default = tuple(spec.default)
        every = spec.all

        def switch_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output]
        ) -> list[Item]:
            routed = []
            for item in items:
                targets: tuple[str, ...] = ()
                for index, (matches, to) in enumerate(cases):
                    try:
                        matched = matches(item.document, ctx)
                    except ExpressionRuntimeError as exc:
                        raise RoutingError(
                            "expression",
                            f"{field}.cases[{index}].when: {exc}",
                            expression=sources[index],
                            stage=field,
                        ) from None
                    if matched:
                        if not every:
                            targets = to
                            break
                        targets += tuple(t for t in to if t not in targets)
                item.targets = targets or default
                if item.targets:
                    routed.append(item)
            return routed

        return switch_step, False

    def _set_headers(self, assignments: dict[str, str], field: str) -> Step:
        compiled = [
            (name, self.expression(source, f"{field}.{name}"))
            for name, source in assignments.items()
        ]

        def set_headers_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output]
        ) -> list[Item]:
            for item in items:
                headers = item.headers if item.headers is not None else {}
                for name, expr in compiled:
                    try:
                        value = expr(item.document, ctx)
                    except ExpressionRuntimeError as exc:
                        raise _evaluation_error(exc, expr, field) from None
                    if value is not None:
                        headers[name] = header_value(value)
                item.headers = headers
            return items

        return set_headers_step, False

    def _validate(self, spec: Any, field: str) -> Step:
        try:
            check: Validator = (
                schema_validator(self.resolve_path(spec.schema))
                if spec.schema is not None
                else type_validator(spec.type)
            )
        except ValueError as exc:
            raise StageCompileError(field, str(exc)) from None
        reference = spec.schema or spec.type

        def validate_step(
            items: list[Item], _c: MessageContext | None, _o: list[Output]
        ) -> list[Item]:
            for item in items:
                problem = check(item.document)
                if problem is not None:
                    path, message = problem
                    raise RoutingError(
                        "validation",
                        f"{field}: {path}: {message} (against {reference})",
                        stage=field,
                        headers={"Busway-Validation-Path": path},
                    )
            return items

        return validate_step, False

    def _wiretap(self, subject: str, field: str) -> Step:
        def wiretap_step(
            items: list[Item], _c: MessageContext | None, side: list[Output]
        ) -> list[Item]:
            for item in items:
                side.append(Output(TAP, subject, orjson.dumps(item.document), item.headers))
            return items

        return wiretap_step, False

    def _reply(self, source: str, field: str) -> Step:
        expr = self.expression(source, field)
        self.needs_context = True  # the inbox is in the input's headers

        def reply_step(
            items: list[Item], ctx: MessageContext | None, side: list[Output]
        ) -> list[Item]:
            inbox = ctx.headers.get(REPLY_TO_HEADER) if ctx is not None and ctx.headers else None
            if inbox:
                for item in items:
                    try:
                        answer = expr(item.document, ctx)
                    except ExpressionRuntimeError as exc:
                        raise _evaluation_error(exc, expr, field) from None
                    side.append(Output(REPLY, inbox, orjson.dumps(answer), item.headers))
            return items

        return reply_step, False

    def _python(self, spec: str | PythonStage, field: str) -> Step:
        """Your function, always run as a waiting stage: an `async` one under a timeout, a
        blocking one in a worker thread under a timeout (so it never blocks the loop)."""
        if isinstance(spec, str):
            spec = PythonStage(function=spec)
        reference = spec.function
        timeout = float(spec.timeout) if spec.timeout is not None else python_timeout(self.ack_wait)
        try:
            function = load_object(reference)
        except ValueError as exc:
            raise StageCompileError(field, str(exc)) from None
        if not callable(function):
            raise StageCompileError(field, f"{reference!r} is not callable")
        try:
            takes_context = len(inspect.signature(function).parameters) >= 2
        except (TypeError, ValueError):
            takes_context = False
        if takes_context:
            self.needs_context = True

        def failure(exc: Exception) -> RoutingError:
            if isinstance(exc, Reject):
                return RoutingError(
                    "rejected", f"{reference} rejected the message: {exc}", stage=field
                )
            if isinstance(exc, TimeoutError):
                return RoutingError(
                    "timeout",
                    f"{field}: {reference} did not return within {timeout:g}s",
                    stage=field,
                    transient=True,
                )
            return RoutingError(
                "python",
                f"{reference} raised {type(exc).__name__}: {exc}",
                stage=field,
                transient=True,
            )

        if inspect.iscoroutinefunction(function):

            async def call(document: Any, ctx: MessageContext | None) -> Any:
                with anyio.fail_after(timeout):
                    if takes_context:
                        return await function(document, ctx)
                    return await function(document)

        else:
            threaded = ThreadedCall(function, timeout=timeout, threads=spec.threads)

            async def call(document: Any, ctx: MessageContext | None) -> Any:
                if takes_context:
                    return await threaded(document, ctx)
                return await threaded(document)

        async def python_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output], _s: RouteServices
        ) -> list[Item]:
            kept = []
            for item in items:
                try:
                    result = await call(item.document, ctx)
                except Exception as exc:
                    raise failure(exc) from exc
                if result is not None:
                    item.document = result
                    kept.append(item)
            return kept

        return python_step, True

    # -- protected payloads (busway.routers.crypto_stages, busway.routers.redact) -------------

    def _encrypt(self, spec: CryptoStage, field: str) -> Step:
        return self._protect(crypto_stages.encrypt, spec, field)

    def _decrypt(self, spec: CryptoStage, field: str) -> Step:
        return self._protect(crypto_stages.decrypt, spec, field)

    def _sign(self, spec: SignatureStage, field: str) -> Step:
        return self._protect(crypto_stages.sign, spec, field)

    def _verify(self, spec: SignatureStage, field: str) -> Step:
        if spec.field is None:
            self.needs_context = True  # the signature is in the input's headers
        return self._protect(crypto_stages.verify, spec, field)

    def _redact(self, spec: RedactStage, field: str) -> Step:
        try:
            return redact(spec, field)
        except RedactStageError as exc:
            raise StageCompileError(exc.field, str(exc)) from None

    def _protect(
        self, build: Callable[[Any, str, Callable[[str], Path]], Step], spec: Any, field: str
    ) -> Step:
        try:
            return build(spec, field, self.resolve_path)
        except crypto_stages.CryptoStageError as exc:
            raise StageCompileError(exc.field, str(exc)) from None

    # -- stages that wait on the outside world ------------------------------------------------

    def _enrich(self, spec: Any, field: str) -> Step:
        body = self.expression(spec.body, f"{field}.body") if spec.body else None
        into = self._path(spec.into, f"{field}.into") if spec.into else None
        subject, timeout = spec.request, float(spec.timeout)

        async def enrich_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output], services: RouteServices
        ) -> list[Item]:
            for item in items:
                try:
                    request = body(item.document, ctx) if body is not None else item.document
                except ExpressionRuntimeError as exc:
                    raise _evaluation_error(exc, body, field) from None  # type: ignore[arg-type]
                try:
                    answer = await services.request(
                        subject, orjson.dumps(request), dict(item.headers or {}), timeout
                    )
                except TimeoutError:
                    raise RoutingError(
                        "enrich",
                        f"{field}: no answer from {subject!r} within {timeout:g}s "
                        "(is a route with a `reply` stage consuming it?)",
                        stage=field,
                        transient=True,
                    ) from None
                try:
                    value = orjson.loads(answer)
                except orjson.JSONDecodeError as exc:
                    raise RoutingError(
                        "enrich",
                        f"{field}: the answer from {subject!r} is not JSON: {exc}",
                        stage=field,
                    ) from None
                try:
                    if into is not None:
                        into.set(item.document, value)
                    elif isinstance(value, dict) and isinstance(item.document, dict):
                        item.document.update(value)
                    else:
                        raise PathError("set `into`: the body or the answer is not an object")
                except PathError as exc:
                    raise RoutingError("enrich", f"{field}: {exc}", stage=field) from None
            return items

        return enrich_step, True

    def _dedupe(self, spec: Any, field: str) -> Step:
        key = self.expression(spec.key, f"{field}.key")
        window = float(spec.window)
        scope = f"{self.route}.{field.split('.')[0].replace('[', '').replace(']', '')}"
        self.needs_context = True  # the owner of a key is the input's sequence

        async def dedupe_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output], services: RouteServices
        ) -> list[Item]:
            owner_base = f"{ctx.stream}:{ctx.sequence}" if ctx is not None else ""
            kept = []
            for index, item in enumerate(items):
                try:
                    value = key(item.document, ctx)
                except ExpressionRuntimeError as exc:
                    raise _evaluation_error(exc, key, field) from None
                if value is None:
                    raise RoutingError(
                        "expression",
                        f"{field}: the key {key.source!r} is null for this message",
                        expression=key.source,
                        stage=field,
                    )
                if await services.claim(
                    scope, header_value(value), f"{owner_base}:{index}", window
                ):
                    kept.append(item)
            return kept

        return dedupe_step, True

    def _throttle(self, spec: Any, field: str) -> Step:
        key = self.expression(spec.key, f"{field}.key") if spec.key else None
        buckets = TokenBuckets(spec.rate, float(spec.per))

        async def throttle_step(
            items: list[Item], ctx: MessageContext | None, _: list[Output], _s: RouteServices
        ) -> list[Item]:
            for item in items:
                try:
                    value = key(item.document, ctx) if key is not None else None
                except ExpressionRuntimeError as exc:
                    raise _evaluation_error(exc, key, field) from None  # type: ignore[arg-type]
                delay = buckets.delay(header_value(value) if value is not None else None)
                if delay > 0:
                    await anyio.sleep(delay)
            return items

        return throttle_step, True

    def _path(self, text: str, field: str) -> Any:
        try:
            return parse_path(text)
        except PathError as exc:
            raise StageCompileError(field, str(exc)) from None
