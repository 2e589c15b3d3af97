"""SFTP adapters: the `sftp` source (a polled remote directory) and the `sftp` sink."""

from busway import Adapter
from busway.adapters.sftp._server import SftpServerConfig
from busway.adapters.sftp.sink import SftpSink, SftpSinkConfig
from busway.adapters.sftp.source import SftpSource, SftpSourceConfig

__all__ = [
    "SftpServerConfig",
    "SftpSink",
    "SftpSinkConfig",
    "SftpSource",
    "SftpSourceConfig",
    "adapter",
]

adapter: Adapter[SftpSourceConfig, SftpSinkConfig] = Adapter(
    type="sftp",
    source_config=SftpSourceConfig,
    create_source=SftpSource,
    sink_config=SftpSinkConfig,
    create_sink=SftpSink,
)
