"""Everything a config describes, compiled and constructed, without any I/O.

`busway check` stops here; `Bus` builds a plan first, so a config that would fail at run time
because of an expression or an adapter's settings fails before anything connects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from busway._components import BuildContext, Sink, Source
from busway._config.cycles import CycleReport, check_cycles
from busway._config.model import Config, RouteConfig, SinkConfig, SourceConfig
from busway._errors import BuswayError, ConfigError
from busway._registry import AdapterRegistry
from busway.routers.route import Route, RouteCompileError, compile_route

__all__ = ["Plan", "build_plan", "component_type"]

C = TypeVar("C", SourceConfig, SinkConfig)
T = TypeVar("T", Source, Sink)


@dataclass(frozen=True)
class Plan:
    """The compiled routes and constructed adapters of a config, in config order."""

    config: Config
    routes: list[tuple[RouteConfig, Route]]
    sources: list[tuple[SourceConfig, Source]]
    sinks: list[tuple[SinkConfig, Sink]]
    cycles: CycleReport
    """Which routes count hops because a cycle may pass through them (`busway._config.cycles`)."""

    def hop_limit(self, route: RouteConfig) -> int | None:
        """The hop limit `route` enforces at run time; None for routes no cycle can reach."""
        return route.hop_limit if route.name in self.cycles.counted else None


def build_plan(config: Config, registry: AdapterRegistry, *, file: str | None = None) -> Plan:
    """Compile every route and construct every adapter of `config`; ConfigError if any fails."""
    try:
        cycles = check_cycles(config)
    except ConfigError as exc:
        raise exc.located(file=file) from None
    context = BuildContext(base_dir=Path(config.base_dir))
    routes = []
    for index, route in enumerate(config.routes):
        try:
            compiled = compile_route(
                name=route.name,
                to=route.to,
                when=route.when,
                transform=route.transform,
                stages=route.stages,
                resolve_path=context.resolve_path,
                ack_wait=float(route.ack_wait),
            )
        except RouteCompileError as exc:
            raise ConfigError(
                exc.detail, file=file, path=f"$.routes[{index}].{exc.field}"
            ) from None
        routes.append((route, compiled))
    sources = [
        (
            source,
            _construct(registry[component_type(source)].build_source, source, context, i, file),
        )
        for i, source in enumerate(config.sources)
    ]
    sinks = [
        (sink, _construct(registry[component_type(sink)].build_sink, sink, context, i, file))
        for i, sink in enumerate(config.sinks)
    ]
    return Plan(config=config, routes=routes, sources=sources, sinks=sinks, cycles=cycles)


def _construct(
    build: Callable[[C, BuildContext], T],
    config: C,
    context: BuildContext,
    index: int,
    file: str | None,
) -> T:
    """`build(config, context)`, its errors located at the component's key path."""
    path = f"$.{'sources' if isinstance(config, SourceConfig) else 'sinks'}[{index}]"
    try:
        return build(config, context)
    except ConfigError as exc:
        raise exc.located(file=file, path_prefix=path) from None
    except BuswayError as exc:
        raise ConfigError(str(exc), file=file, path=path) from None


def component_type(config: SourceConfig | SinkConfig) -> str:
    """The `type = "..."` name a source or sink config was decoded with (its struct's tag)."""
    return str(type(config).__struct_config__.tag)
