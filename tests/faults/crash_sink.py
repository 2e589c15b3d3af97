"""A sink adapter for the crash scenarios: kills the whole process on one poison message.

Registered as type `crash-test` through a `busway.adapters` entry point that the test writes
into a temporary `*.dist-info` folder on the daemon's PYTHONPATH, the way a third-party
adapter package is found. It writes one JSON line per message (`id`, the size of the batch it
came in, its delivery count), skipping ids it has already written, as real sinks do with
`Message.id`: so a message delivered before a crash but not acked is not written twice.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import orjson

from busway import Adapter, BuildContext, Message, Sink, SinkConfig


class CrashSinkConfig(SinkConfig, tag="crash-test", frozen=True, kw_only=True):
    """`path`: the lines file; `poison`: the `id` whose write calls `os._exit(1)`."""

    path: str
    poison: int


class CrashSink(Sink):
    """Appends lines with unbuffered writes: `os._exit` loses nothing already written."""

    def __init__(self, config: CrashSinkConfig, context: BuildContext) -> None:
        self.path = context.resolve_path(config.path)
        self.poison = config.poison
        self.written: set[str] = set()
        self.fd = -1

    async def open(self) -> None:
        if self.path.exists():
            self.written = {
                orjson.loads(line)["message_id"] for line in self.path.read_bytes().splitlines()
            }
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    async def write(self, batch: Sequence[Message]) -> None:
        for message in batch:
            body = orjson.loads(message.data)
            if body["id"] == self.poison:
                os._exit(1)  # what a segfaulting driver does to the daemon
            if message.id in self.written:
                continue
            line = {
                "message_id": message.id,
                "id": body["id"],
                "batch": len(batch),
                "delivery": message.attempt,
            }
            os.write(self.fd, orjson.dumps(line) + b"\n")
            self.written.add(message.id)

    async def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)


adapter = Adapter(type="crash-test", sink_config=CrashSinkConfig, create_sink=CrashSink)


def register(plugins: Path) -> None:
    """Make `crash-test` an installed adapter for processes with `plugins` on PYTHONPATH."""
    info = plugins / "busway_crash_test-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: busway-crash-test\nVersion: 0\n")
    (info / "entry_points.txt").write_text(
        "[busway.adapters]\ncrash-test = tests.faults.crash_sink:adapter\n"
    )
