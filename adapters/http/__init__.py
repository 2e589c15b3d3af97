"""HTTP adapters: the `http` source, an ingest endpoint that answers 202 once stored."""

from busway import Adapter
from busway.adapters.http.source import HttpSource, HttpSourceConfig

__all__ = ["HttpSource", "HttpSourceConfig", "adapter"]

adapter = Adapter(type="http", source_config=HttpSourceConfig, create_source=HttpSource)
