"""File adapters: the `file` source (a watched inbox directory) and the `file` sink."""

from busway import Adapter
from busway.adapters.file.sink import FileSink, FileSinkConfig
from busway.adapters.file.source import FileSource, FileSourceConfig

__all__ = ["FileSink", "FileSinkConfig", "FileSource", "FileSourceConfig", "adapter"]

adapter: Adapter[FileSourceConfig, FileSinkConfig] = Adapter(
    type="file",
    source_config=FileSourceConfig,
    create_source=FileSource,
    sink_config=FileSinkConfig,
    create_sink=FileSink,
)
