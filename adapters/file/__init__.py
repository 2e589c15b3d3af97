"""File adapters: the `file` sink, appending JSON lines with an fsync per batch."""

from busway import Adapter
from busway.adapters.file.sink import FileSink, FileSinkConfig

__all__ = ["FileSink", "FileSinkConfig", "adapter"]

adapter = Adapter(type="file", sink_config=FileSinkConfig, create_sink=FileSink)
