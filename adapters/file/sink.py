"""The `file` sink: append each message as one JSON line, fsync, then let the engine ack.

    [[sinks]]
    name = "big-orders-file"
    type = "file"
    from = "orders.big"
    path = "var/out/big-orders.jsonl"

A batch is written with one `write` and one `fsync` in a worker thread; the engine acks its
messages only after both returned, so an acked message is on disk. If the write fails midway
(disk full), the file is truncated back to where the batch began: a reader never sees half a
line, and the retried batch starts clean. A body that is not JSON is dead-lettered on its own
while the rest of the batch is written.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import anyio
import orjson

from busway import (
    BatchError,
    BuildContext,
    DeliveryError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    SinkConfig,
)

__all__ = ["FileSink", "FileSinkConfig"]

logger = logging.getLogger("busway.adapters.file")


class FileSinkConfig(SinkConfig, tag="file", frozen=True, kw_only=True):
    """Append JSON lines to `path` (relative paths start at the config file's directory)."""

    path: str
    fsync: bool = True


class FileSink(Sink):
    """Appends message bodies as JSON lines; durable (fsynced) before the batch is acked."""

    def __init__(self, config: FileSinkConfig, context: BuildContext) -> None:
        self.config = config
        self.path: Path = context.resolve_path(config.path)
        self._fd: int | None = None
        self._healthy = True

    async def open(self) -> None:
        """Open the file now, to report a bad path at start-up; a failure here is not fatal.

        The path may become writable later (a volume mounted, space freed): messages wait,
        are retried with back-off, and readiness stays false until a write succeeds.
        """
        try:
            await anyio.to_thread.run_sync(self._open)
        except RetryableError as exc:
            logger.warning("%s", exc)

    async def write(self, batch: Sequence[Message]) -> None:
        """Append every JSON body of `batch` and fsync; non-JSON bodies fail on their own."""
        lines = bytearray()
        failures: dict[int, DeliveryError] = {}
        for index, message in enumerate(batch):
            data = message.data
            try:
                document = orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                failures[index] = PermanentError(
                    f"message {message.id} on {message.subject} is not JSON ({exc}); "
                    f"the file sink writes JSON lines"
                )
                continue
            lines += data if b"\n" not in data else orjson.dumps(document)
            lines += b"\n"
        if lines:
            await anyio.to_thread.run_sync(self._append, bytes(lines))
        if failures:
            raise BatchError(failures)

    async def close(self) -> None:
        """Close the file."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def ready(self) -> bool:
        """False after a failed write, until a write succeeds again."""
        return self._healthy

    def _open(self) -> int:
        if self._fd is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            except OSError as exc:
                self._healthy = False
                raise RetryableError(self._explain("open", exc)) from exc
        return self._fd

    def _append(self, data: bytes) -> None:
        fd = self._open()
        start = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if self.config.fsync:
                os.fsync(fd)
        except OSError as exc:
            self._healthy = False
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            raise RetryableError(self._explain("write", exc)) from exc
        self._healthy = True

    def _explain(self, action: str, exc: OSError) -> str:
        hint = {
            errno.ENOSPC: "the disk is full: free space; messages wait and are retried",
            errno.EACCES: "permission denied: give the busway user write access",
            errno.EROFS: "the file system is read-only",
        }.get(exc.errno or 0, "messages wait and are retried")
        return f"cannot {action} {self.path}: {exc.strerror} ({hint})"
