"""A route compiled from its config: decode, run the stages, encode, in one call.

This is the broker-free half of a route: the engine hands `process` the raw body of a message
and publishes the `Output`s that come back, acking the input once all of kind OUT are stored.
Expressions are compiled once here, at start-up; processing never parses anything.

A route with only `when` and `transform` takes a short path (decode, test, map, encode) with no
per-stage bookkeeping: that is the common case and the one the hop benchmark measures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import orjson

from busway.routers.context import MessageContext
from busway.routers.expression import Expression, ExpressionRuntimeError
from busway.routers.pipeline import (
    OUT,
    AsyncStep,
    Item,
    Output,
    RouteServices,
    RoutingError,
    Step,
    SyncStep,
    expression_error,
)
from busway.routers.stage_compiler import StageCompileError, StageCompiler, header_value
from busway.routers.stages import AggregateStage, StageConfig

__all__ = [
    "Aggregation",
    "Route",
    "RouteCompileError",
    "RoutingError",
    "compile_route",
    "encode_error",
]


class RouteCompileError(Exception):
    """Part of the route does not compile; `field` says which (`when`, `stages[2].set.a`)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.detail = message
        super().__init__(f"{field}: {message}")


class Aggregation:
    """The compiled `aggregate` stage: the group key, when a group is complete, its body."""

    __slots__ = ("by", "complete_when", "count", "into", "timeout")

    def __init__(
        self,
        by: Expression,
        count: int | None,
        timeout: float | None,
        complete_when: Expression | None,
        into: Expression | None,
    ) -> None:
        self.by = by
        self.count = count
        self.timeout = timeout
        self.complete_when = complete_when
        self.into = into

    def key(self, document: Any, context: MessageContext | None) -> str:
        """The correlation key of `document`; RoutingError if it is null or fails."""
        try:
            value = self.by(document, context)
        except ExpressionRuntimeError as exc:
            raise expression_error(exc, self.by.source, "aggregate.by", "aggregate") from None
        if value is None:
            raise RoutingError(
                "expression",
                f"aggregate.by: {self.by.source!r} is null for this message",
                expression=self.by.source,
                stage="aggregate",
            )
        return header_value(value)

    @staticmethod
    def group(key: str, documents: list[Any]) -> dict[str, Any]:
        """What `complete_when` and `into` see: `{key, count, messages}`."""
        return {"key": key, "count": len(documents), "messages": documents}

    def is_complete(self, group: dict[str, Any]) -> bool:
        """True once the group reached `count` or `complete_when` holds (timeouts aside)."""
        if self.count is not None and group["count"] >= self.count:
            return True
        if self.complete_when is None:
            return False
        try:
            return self.complete_when.is_truthy(group)
        except ExpressionRuntimeError as exc:
            raise expression_error(
                exc, self.complete_when.source, "aggregate.complete_when", "aggregate"
            ) from None

    def body(self, group: dict[str, Any]) -> Any:
        """The aggregate message's body."""
        if self.into is None:
            return group
        try:
            return self.into(group)
        except ExpressionRuntimeError as exc:
            raise expression_error(exc, self.into.source, "aggregate.into", "aggregate") from None


class Route:
    """A compiled route. Pure: no I/O of its own; async stages reach out via `RouteServices`.

    `process` serves routes whose stages are all synchronous (`is_async` False); the others
    use `process_async`. Routes with an `aggregate` stage use `collect` and `finish`.
    """

    __slots__ = (
        "_post",
        "_pre",
        "_simple",
        "_transform",
        "_when",
        "aggregation",
        "is_async",
        "name",
        "needs_context",
        "needs_json",
        "to",
    )

    def __init__(
        self,
        *,
        name: str,
        to: Sequence[str],
        when: Expression | None = None,
        transform: Expression | None = None,
        pre: Sequence[Step] = (),
        aggregation: Aggregation | None = None,
        post: Sequence[Step] = (),
        needs_context: bool = False,
    ) -> None:
        self.name = name
        self.to = tuple(to)
        self._when = when
        self._transform = transform
        self._pre = tuple(pre)
        self._post = tuple(post)
        self.aggregation = aggregation
        self._simple = not pre and not post and aggregation is None
        self.needs_json = not self._simple or when is not None or transform is not None
        self.needs_context = needs_context
        """True if a stage reads the message context (`subject()`, `header()`, a reply...)."""
        self.is_async = any(is_async for _, is_async in (*self._pre, *self._post))

    def decode(self, data: bytes) -> Any:
        """The JSON body; RoutingError(kind="decode") if it is not JSON."""
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError as exc:
            raise RoutingError("decode", f"body is not valid JSON: {exc}") from None

    def process(self, data: bytes, context: MessageContext | None = None) -> list[Output]:
        """The outputs of a message, for a route without async stages or aggregation.

        `context` is the message's subject, headers and metadata, for `subject()` & co.
        An empty list means the message was filtered. Raises RoutingError.
        """
        if not self.needs_json:
            return [Output(OUT, subject, data, None) for subject in self.to]
        document = self.decode(data)
        if self._simple:
            return self._process_simple(data, document, context)
        side: list[Output] = []
        items = self._begin(document, context)
        for step, _ in self._pre:
            items = cast(SyncStep, step)(items, context, side)
            if not items:
                break
        return self._outputs(items, side)

    async def process_async(
        self, data: bytes, context: MessageContext | None, services: RouteServices
    ) -> list[Output]:
        """`process` for routes with async stages (enrich, dedupe, throttle, async Python)."""
        side: list[Output] = []
        items = await self._run(
            self._pre, self._begin(self.decode(data), context), context, side, services
        )
        return self._outputs(items, side)

    async def collect(
        self, data: bytes, context: MessageContext | None, services: RouteServices
    ) -> tuple[list[tuple[str, Any]], list[Output]]:
        """For aggregating routes: the `(key, body)` pairs to add to groups, and side outputs."""
        assert self.aggregation is not None
        side: list[Output] = []
        items = await self._run(
            self._pre, self._begin(self.decode(data), context), context, side, services
        )
        key = self.aggregation.key
        return [(key(item.document, context), item.document) for item in items], side

    async def finish(self, key: str, documents: list[Any], services: RouteServices) -> list[Output]:
        """The outputs of a completed group: its body through the stages after `aggregate`."""
        assert self.aggregation is not None
        body = self.aggregation.body(self.aggregation.group(key, documents))
        side: list[Output] = []
        items = await self._run(self._post, [Item(body)], None, side, services)
        return self._outputs(items, side)

    def _process_simple(
        self, data: bytes, document: Any, context: MessageContext | None
    ) -> list[Output]:
        when = self._when
        if when is not None:
            try:
                if not when.is_truthy(document, context):
                    return []
            except ExpressionRuntimeError as exc:
                raise expression_error(exc, when.source, "when") from None
        transform = self._transform
        if transform is not None:
            try:
                data = orjson.dumps(transform(document, context))
            except ExpressionRuntimeError as exc:
                raise expression_error(exc, transform.source, "transform") from None
            except orjson.JSONEncodeError as exc:
                raise encode_error(exc) from None
        return [Output(OUT, subject, data, None) for subject in self.to]

    def _begin(self, document: Any, context: MessageContext | None) -> list[Item]:
        return [Item(document)]

    @staticmethod
    async def _run(
        steps: tuple[Step, ...],
        items: list[Item],
        context: MessageContext | None,
        side: list[Output],
        services: RouteServices,
    ) -> list[Item]:
        for step, is_async in steps:
            if is_async:
                items = await cast(AsyncStep, step)(items, context, side, services)
            else:
                items = cast(SyncStep, step)(items, context, side)
            if not items:
                break
        return items

    def _outputs(self, items: list[Item], side: list[Output]) -> list[Output]:
        outputs: list[Output] = []
        for item in items:
            targets = item.targets if item.targets is not None else self.to
            if targets:
                try:
                    body = orjson.dumps(item.document)
                except orjson.JSONEncodeError as exc:
                    raise encode_error(exc) from None
                outputs.extend(Output(OUT, subject, body, item.headers) for subject in targets)
        if side:
            outputs.extend(side)
        return outputs


def encode_error(exc: Exception) -> RoutingError:
    """The RoutingError for a result that cannot be written as JSON: nested deeper than 255
    levels, or holding a value JSON has no form for (a `set` returned by a `python` stage).
    Permanent: the same body fails the same way every time."""
    return RoutingError(
        "encode",
        f"the message after the route's stages cannot be written as JSON: {exc} "
        "(at most 255 levels of nesting; objects, arrays, strings, numbers, booleans, null)",
    )


def compile_route(
    *,
    name: str,
    to: Sequence[str],
    when: str | None = None,
    transform: str | None = None,
    stages: Sequence[StageConfig] = (),
    resolve_path: Callable[[str], Path] = Path,
    ack_wait: float | None = None,
) -> Route:
    """Compile a route: `when` first, then `stages` in order, then `transform`.

    RouteCompileError names the field that failed. A route needs a per-message context only if
    a stage reads the subject, headers or metadata; others skip building one. `ack_wait` (the
    route's) sets the default timeout of `python` stages.
    """
    compiler = StageCompiler(name, resolve_path, ack_wait)
    if not stages:
        try:
            compiled_when = compiler.expression(when, "when") if when is not None else None
            compiled_transform = (
                compiler.expression(transform, "transform") if transform is not None else None
            )
        except StageCompileError as exc:
            raise RouteCompileError(exc.field, str(exc)) from None
        return Route(
            name=name,
            to=to,
            when=compiled_when,
            transform=compiled_transform,
            needs_context=compiler.needs_context,
        )
    pre: list[Step] = []
    post: list[Step] = []
    aggregation: Aggregation | None = None
    try:
        if when is not None:
            pre.append(compiler.compile(StageConfig(filter=when), "when"))
        for index, stage in enumerate(stages):
            field = f"stages[{index}]"
            if stage.aggregate is not None:
                if aggregation is not None:
                    raise StageCompileError(
                        f"{field}.aggregate", "a route has at most one aggregate"
                    )
                aggregation = _aggregation(compiler, stage.aggregate, f"{field}.aggregate")
                continue
            (post if aggregation is not None else pre).append(compiler.compile(stage, field))
        if transform is not None:
            step = compiler.compile(StageConfig(transform=transform), "transform")
            (post if aggregation is not None else pre).append(step)
    except StageCompileError as exc:
        raise RouteCompileError(exc.field, str(exc)) from None
    return Route(
        name=name,
        to=to,
        pre=pre,
        aggregation=aggregation,
        post=post,
        needs_context=compiler.needs_context,
    )


def _aggregation(compiler: StageCompiler, spec: AggregateStage, field: str) -> Aggregation:
    return Aggregation(
        by=compiler.expression(spec.by, f"{field}.by"),
        count=spec.count,
        timeout=float(spec.timeout) if spec.timeout is not None else None,
        complete_when=(
            compiler.expression(spec.complete_when, f"{field}.complete_when")
            if spec.complete_when
            else None
        ),
        into=compiler.expression(spec.into, f"{field}.into") if spec.into else None,
    )
