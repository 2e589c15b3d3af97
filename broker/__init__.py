"""busway: a lightweight enterprise service bus and message router on NATS JetStream.

The public API. Everything else lives in `busway._*` modules and may change without notice.

    import anyio, busway

    async def main() -> None:
        async with busway.Bus.from_file("busway.toml") as bus:
            await bus.wait_until_stopped()

    anyio.run(main)

docs/embedding.md shows more: an application's own adapters, the typed status report, asyncio.
"""

import importlib.metadata as _metadata

from busway._bus import Bus, ReloadReport
from busway._components import (
    BuildContext,
    DedupStore,
    Lease,
    Message,
    PublishAck,
    Publisher,
    Reply,
    Sink,
    Source,
    SourceContext,
    StateEntry,
    StateStore,
)
from busway._config.durations import Duration
from busway._config.model import (
    CircuitConfig,
    ClusterConfig,
    Config,
    DeadLetterConfig,
    HttpConfig,
    NatsConfig,
    RetryPolicy,
    RouteConfig,
    SinkConfig,
    SourceConfig,
    StreamConfig,
    decode_config,
    load_config,
)
from busway._config.plan import Plan
from busway._dlq.read import (
    DeadLetter,
    DeadLetterError,
    DeadLetterFilters,
    ReplayOutcome,
    ReplayReport,
    get_dead_letter,
    iter_dead_letters,
    list_dead_letters,
)
from busway._dlq.replay import purge_dead_letters, replay_dead_letters
from busway._errors import (
    BatchError,
    BuswayError,
    ConfigError,
    DeliveryError,
    PermanentError,
    PublishError,
    RetryableError,
    StartupError,
)
from busway._observe.metrics import ComponentStats, MetricsCollector
from busway._observe.status import ComponentStatus, StatusReport
from busway._registry import Adapter, AdapterRegistry, default_registry

try:
    __version__ = _metadata.version("busway")
    """The installed distribution's version (pyproject.toml's), as `busway --version` prints."""
except _metadata.PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Adapter",
    "AdapterRegistry",
    "BatchError",
    "BuildContext",
    "Bus",
    "BuswayError",
    "CircuitConfig",
    "ClusterConfig",
    "ComponentStats",
    "ComponentStatus",
    "Config",
    "ConfigError",
    "DeadLetter",
    "DeadLetterConfig",
    "DeadLetterError",
    "DeadLetterFilters",
    "DedupStore",
    "DeliveryError",
    "Duration",
    "HttpConfig",
    "Lease",
    "Message",
    "MetricsCollector",
    "NatsConfig",
    "PermanentError",
    "Plan",
    "PublishAck",
    "PublishError",
    "Publisher",
    "ReloadReport",
    "ReplayOutcome",
    "ReplayReport",
    "Reply",
    "RetryPolicy",
    "RetryableError",
    "RouteConfig",
    "Sink",
    "SinkConfig",
    "Source",
    "SourceConfig",
    "SourceContext",
    "StartupError",
    "StateEntry",
    "StateStore",
    "StatusReport",
    "StreamConfig",
    "__version__",
    "decode_config",
    "default_registry",
    "get_dead_letter",
    "iter_dead_letters",
    "list_dead_letters",
    "load_config",
    "purge_dead_letters",
    "replay_dead_letters",
]
