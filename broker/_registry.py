"""The adapter registry: adapters are found by their `type` name, never imported by the engine.

Built-in adapters and those of other packages register the same way, through the
`busway.adapters` entry-point group: each entry point names an `Adapter` value.

    [project.entry-points."busway.adapters"]
    kafka = "mypackage.kafka:adapter"

An application embedding busway can also register one directly: `registry.register(adapter)`.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from busway._components import BuildContext, Sink, Source
from busway._config.model import SinkConfig, SourceConfig
from busway._errors import ConfigError

__all__ = ["Adapter", "AdapterRegistry", "default_registry"]

ENTRY_POINT_GROUP = "busway.adapters"


@dataclass(frozen=True, kw_only=True)
class Adapter:
    """What an adapter package provides under one `type` name: a source, a sink, or both.

    `source_config` / `sink_config` are msgspec structs subclassing `SourceConfig` / `SinkConfig`
    with `tag="<type>"`. `create_source` / `create_sink` build the component from a decoded
    config and a `BuildContext` without any I/O (that belongs in `Source.run` / `Sink.open`),
    so that `busway check` can build everything without touching the network.
    """

    type: str
    source_config: builtins.type[SourceConfig] | None = None
    create_source: Callable[[Any, BuildContext], Source] | None = None
    sink_config: builtins.type[SinkConfig] | None = None
    create_sink: Callable[[Any, BuildContext], Sink] | None = None

    def __post_init__(self) -> None:
        if (self.source_config is None) != (self.create_source is None):
            raise TypeError(f"adapter {self.type!r}: give both source_config and create_source")
        if (self.sink_config is None) != (self.create_sink is None):
            raise TypeError(f"adapter {self.type!r}: give both sink_config and create_sink")


class AdapterRegistry:
    """Adapters by type name. `AdapterRegistry.from_entry_points()` holds every installed one.

    Entry points are loaded on first use of their type, so a config pays only for the adapters
    it uses (no database driver imported for an HTTP-only deployment), and a broken third-party
    adapter fails the configs that use it, with its import error, not every config.
    """

    def __init__(self, adapters: Iterable[Adapter] = ()) -> None:
        self._adapters: dict[str, Adapter] = {}
        self._unloaded: dict[str, EntryPoint] = {}
        for adapter in adapters:
            self.register(adapter)

    @classmethod
    def from_entry_points(cls) -> AdapterRegistry:
        """A registry of every adapter installed under the `busway.adapters` group."""
        registry = cls()
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            registry._unloaded.setdefault(entry.name, entry)
        return registry

    def register(self, adapter: Adapter) -> None:
        """Add `adapter`; it replaces any adapter of the same type name."""
        self._unloaded.pop(adapter.type, None)
        self._adapters[adapter.type] = adapter

    def get(self, type_name: str) -> Adapter | None:
        """The adapter of `type_name`, loading its entry point if needed; None if unknown.

        Raises ConfigError if the entry point exists but cannot be loaded.
        """
        adapter = self._adapters.get(type_name)
        if adapter is None and type_name in self._unloaded:
            entry = self._unloaded[type_name]
            try:
                loaded = entry.load()
            except Exception as exc:
                raise ConfigError(
                    f"adapter {type_name!r} ({entry.value}) failed to load: {exc!r}; "
                    "is its package installed with all its dependencies?"
                ) from exc
            if not isinstance(loaded, Adapter):
                raise ConfigError(
                    f"entry point {type_name!r} ({entry.value}) is not a busway.Adapter"
                )
            self.register(loaded)
            adapter = loaded
        return adapter

    def __getitem__(self, type_name: str) -> Adapter:
        adapter = self.get(type_name)
        if adapter is None:
            raise KeyError(type_name)
        return adapter

    def __contains__(self, type_name: object) -> bool:
        return type_name in self._adapters or type_name in self._unloaded

    @property
    def types(self) -> list[str]:
        """Registered type names, sorted."""
        return sorted({*self._adapters, *self._unloaded})

    def source_config(self, type_name: str) -> type[SourceConfig] | None:
        """The config struct of source type `type_name`, or None if no adapter has one."""
        adapter = self.get(type_name)
        return adapter.source_config if adapter else None

    def sink_config(self, type_name: str) -> type[SinkConfig] | None:
        """The config struct of sink type `type_name`, or None if no adapter has one."""
        adapter = self.get(type_name)
        return adapter.sink_config if adapter else None


_default: AdapterRegistry | None = None


def default_registry() -> AdapterRegistry:
    """The process-wide registry of installed adapters, loaded on first use."""
    global _default
    if _default is None:
        _default = AdapterRegistry.from_entry_points()
    return _default
