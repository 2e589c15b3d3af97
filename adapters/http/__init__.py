"""HTTP adapters: the `http` source (an ingest API that answers 202 once stored) and the `http`
sink (webhook delivery with retries, signatures and optional batching)."""

from busway import Adapter
from busway.adapters.http.sink import HttpSink, HttpSinkConfig
from busway.adapters.http.source import HttpSource, HttpSourceConfig

__all__ = ["HttpSink", "HttpSinkConfig", "HttpSource", "HttpSourceConfig", "adapter"]

adapter: Adapter[HttpSourceConfig, HttpSinkConfig] = Adapter(
    type="http",
    source_config=HttpSourceConfig,
    create_source=HttpSource,
    sink_config=HttpSinkConfig,
    create_sink=HttpSink,
)
