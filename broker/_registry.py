"""The adapter registry: adapters are found by their `type` name, never imported by the engine.

Built-in adapters and those of other packages register the same way, through the
`busway.adapters` entry-point group: each entry point names an `Adapter` value.

    [project.entry-points."busway.adapters"]
    kafka = "mypackage.kafka:adapter"

An application embedding busway adds its own adapters to the installed ones in one call, and
a type name given twice is an error naming both, never a silent replacement:

    registry = AdapterRegistry.default().with_adapters(my_adapter)
    bus = Bus.from_file("busway.toml", adapters=[my_adapter])   # the same, done by Bus
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, Never

from typing_extensions import TypeVar

from busway._components import BuildContext, Sink, Source
from busway._config.model import SinkConfig, SourceConfig
from busway._errors import ConfigError

__all__ = ["Adapter", "AdapterRegistry", "default_registry"]

ENTRY_POINT_GROUP = "busway.adapters"

# Covariant, so that every `Adapter[X, Y]` is an `Adapter[SourceConfig, SinkConfig]` and one
# registry holds them all. That would let a caller hand `create_source` a config of another
# adapter; `build_source` / `build_sink` check the config's class first, and the engine only
# builds through them. `Never` by default: a sink-only adapter is `Adapter[Never, MySinkConfig]`.
SourceConfigT = TypeVar("SourceConfigT", bound=SourceConfig, covariant=True, default=Never)
SinkConfigT = TypeVar("SinkConfigT", bound=SinkConfig, covariant=True, default=Never)


@dataclass(frozen=True, kw_only=True)
class Adapter(Generic[SourceConfigT, SinkConfigT]):
    """What an adapter package provides under one `type` name: a source, a sink, or both.

    `source_config` / `sink_config` are msgspec structs subclassing `SourceConfig` / `SinkConfig`
    with `tag="<type>"`. `create_source` / `create_sink` build the component from a decoded
    config of exactly that struct and a `BuildContext`, without any I/O (that belongs in
    `Source.run` / `Sink.open`), so that `busway check` can build everything without touching
    the network. The type parameters are the two config structs; a type checker infers them:

        adapter = Adapter(type="memory", sink_config=MemoryConfig, create_sink=MemorySink)
        # Adapter[Never, MemoryConfig]: create_sink must accept a MemoryConfig
    """

    type: str
    source_config: builtins.type[SourceConfigT] | None = None
    create_source: Callable[[SourceConfigT, BuildContext], Source] | None = None
    sink_config: builtins.type[SinkConfigT] | None = None
    create_sink: Callable[[SinkConfigT, BuildContext], Sink] | None = None

    def __post_init__(self) -> None:
        if (self.source_config is None) != (self.create_source is None):
            raise TypeError(f"adapter {self.type!r}: give both source_config and create_source")
        if (self.sink_config is None) != (self.create_sink is None):
            raise TypeError(f"adapter {self.type!r}: give both sink_config and create_sink")

    def build_source(self, config: SourceConfig, context: BuildContext) -> Source:
        """The source for `config`, which must be an instance of `source_config`."""
        if self.source_config is None or self.create_source is None:
            raise TypeError(f"adapter {self.type!r} provides no source")
        if not isinstance(config, self.source_config):
            raise TypeError(
                f"adapter {self.type!r} builds sources from {self.source_config.__name__}, "
                f"not {type(config).__name__}"
            )
        return self.create_source(config, context)

    def build_sink(self, config: SinkConfig, context: BuildContext) -> Sink:
        """The sink for `config`, which must be an instance of `sink_config`."""
        if self.sink_config is None or self.create_sink is None:
            raise TypeError(f"adapter {self.type!r} provides no sink")
        if not isinstance(config, self.sink_config):
            raise TypeError(
                f"adapter {self.type!r} builds sinks from {self.sink_config.__name__}, "
                f"not {type(config).__name__}"
            )
        return self.create_sink(config, context)

    @property
    def origin(self) -> str:
        """Where this adapter's code lives (the module and name of its factories), for errors
        that must tell two adapters of one type name apart."""
        factory: object = self.create_source or self.create_sink
        module = getattr(factory, "__module__", None)
        name = getattr(factory, "__qualname__", None)
        return f"{module}.{name}" if module and name else repr(self)


class AdapterRegistry:
    """Adapters by type name.

    `AdapterRegistry.default()` holds every installed adapter (busway's built-ins and those of
    other packages); `AdapterRegistry([...])` holds only the adapters given, for tests that want
    nothing else. Entry points are loaded on first use of their type, so a config pays only for
    the adapters it uses (no database driver imported for an HTTP-only deployment), and a broken
    or ambiguous third-party adapter fails the configs that use it, with its reason, not every
    config.
    """

    def __init__(self, adapters: Iterable[Adapter[SourceConfig, SinkConfig]] = ()) -> None:
        self._adapters: dict[str, Adapter[SourceConfig, SinkConfig]] = {}
        self._unloaded: dict[str, EntryPoint] = {}
        # Type names that two installed distributions both claim: every entry point of each.
        self._ambiguous: dict[str, list[EntryPoint]] = {}
        # Where each adapter loaded from an entry point came from, to name it in errors.
        self._loaded_from: dict[str, EntryPoint] = {}
        for adapter in adapters:
            self.register(adapter)

    @classmethod
    def from_entry_points(cls) -> AdapterRegistry:
        """A new registry of every adapter installed under the `busway.adapters` group."""
        registry = cls()
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            first = registry._unloaded.get(entry.name)
            if first is None:
                registry._unloaded[entry.name] = entry
            elif first.value != entry.value:
                registry._ambiguous.setdefault(entry.name, [first]).append(entry)
        return registry

    @classmethod
    def default(cls) -> AdapterRegistry:
        """A new registry of every installed adapter: the built-ins and other packages' ones.

        A new value each call, so `with_adapters` / `register` on it change nothing else;
        `default_registry()` is the shared one the CLI uses.
        """
        return cls.from_entry_points()

    def with_adapters(self, *adapters: Adapter[SourceConfig, SinkConfig]) -> AdapterRegistry:
        """A new registry: this one's adapters plus `adapters`. ConfigError if a type name is
        taken (by this registry or twice among `adapters`); the message names both adapters."""
        registry = AdapterRegistry()
        registry._adapters = dict(self._adapters)
        registry._unloaded = dict(self._unloaded)
        registry._ambiguous = {name: list(entries) for name, entries in self._ambiguous.items()}
        registry._loaded_from = dict(self._loaded_from)
        for adapter in adapters:
            registry.register(adapter)
        return registry

    def register(
        self, adapter: Adapter[SourceConfig, SinkConfig], *, replace: bool = False
    ) -> None:
        """Add `adapter`. A type name already registered is a ConfigError naming both adapters,
        unless `replace=True` (an application that deliberately swaps a built-in). Registering
        an equal adapter again (same type, structs and factories) changes nothing."""
        if not replace and adapter.type in self:
            if self._registered(adapter.type) == adapter:
                return
            raise ConfigError(
                f"adapter type {adapter.type!r} is registered twice: by {adapter.origin} and by "
                f"{self._origin_of(adapter.type)}; give one of them another type name, or "
                "register it with replace=True to replace the other"
            )
        self._unloaded.pop(adapter.type, None)
        self._ambiguous.pop(adapter.type, None)
        self._loaded_from.pop(adapter.type, None)
        self._adapters[adapter.type] = adapter

    def get(self, type_name: str) -> Adapter[SourceConfig, SinkConfig] | None:
        """The adapter of `type_name`, loading its entry point if needed; None if unknown.

        Raises ConfigError if the entry point cannot be loaded, or if two installed
        distributions both provide `type_name`.
        """
        adapter = self._adapters.get(type_name)
        if adapter is not None or type_name not in self._unloaded:
            return adapter
        ambiguous = self._ambiguous.get(type_name)
        if ambiguous:
            providers = " and by ".join(_describe(entry) for entry in ambiguous)
            raise ConfigError(
                f"adapter type {type_name!r} is provided twice: by {providers}; "
                "uninstall one of them"
            )
        entry = self._unloaded[type_name]
        try:
            loaded = entry.load()
        except Exception as exc:
            raise ConfigError(
                f"adapter {type_name!r} ({entry.value}) failed to load: {exc!r}; "
                "is its package installed with all its dependencies?"
            ) from exc
        if not isinstance(loaded, Adapter):
            raise ConfigError(f"entry point {type_name!r} ({entry.value}) is not a busway.Adapter")
        if loaded.type != type_name:
            raise ConfigError(
                f"entry point {type_name!r} ({entry.value}) names an adapter of type "
                f"{loaded.type!r}; the entry point's name must be the adapter's type"
            )
        self._loaded_from[type_name] = self._unloaded.pop(type_name)
        self._adapters[type_name] = loaded
        return loaded

    def __getitem__(self, type_name: str) -> Adapter[SourceConfig, SinkConfig]:
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

    def _registered(self, type_name: str) -> Adapter[SourceConfig, SinkConfig] | None:
        """The adapter registered as `type_name`, loading its entry point; None if that fails
        (the caller reports the clash, not the load error)."""
        try:
            return self.get(type_name)
        except ConfigError:
            return None

    def _origin_of(self, type_name: str) -> str:
        entry = self._loaded_from.get(type_name) or self._unloaded.get(type_name)
        return _describe(entry) if entry is not None else self._adapters[type_name].origin


def _describe(entry: EntryPoint) -> str:
    """An entry point as an operator can find it: its target and the distribution shipping it."""
    dist = entry.dist
    shipped = f" (installed by {dist.name} {dist.version})" if dist is not None else ""
    return f"the entry point {entry.value}{shipped}"


_default: AdapterRegistry | None = None


def default_registry() -> AdapterRegistry:
    """The process-wide registry of installed adapters, loaded on first use."""
    global _default
    if _default is None:
        _default = AdapterRegistry.from_entry_points()
    return _default
