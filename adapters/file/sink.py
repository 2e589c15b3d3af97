"""The `file` sink: JSON lines appended to one file, or one file per message.

    [[sinks]]
    name = "big-orders-file"
    type = "file"
    from = "orders.big"
    path = "var/out/big-orders.jsonl"       # mode = "append" (the default)
    rotate_bytes = 104857600                # optional: rotate at 100 MiB ...
    rotate_every = "1h"                     # ... or every hour (aligned to the clock)

    [[sinks]]
    name = "invoices-out"
    type = "file"
    from = "invoices.>"
    mode = "per-message"
    path = "var/out/{subject[1]}/{id}.json" # see _template for the placeholders

`append` writes each JSON body as one line; a batch is one write, one fsync, and one line
in the segment's id index (see `_append`), keyed by `Message.id`: a message that comes again
(a redelivery after a crash between the write and the ack, a replayed dead letter, a record a
source publishes again after the stream's duplicate window) is skipped rather than written
twice, and a batch that failed halfway (disk full) is truncated away. A body that is not
JSON is dead-lettered on its own while the rest of the batch is written. Several daemons (or
sinks) may append to one file: they take turns under a lock on `<file>.lock` (see
`_append`), each batch whole, none lost or doubled.

`per-message` writes each body as it is to its own file through a temporary name, fsync and
rename (see `_per_message`): readers never see half a file.

Either way, a file-system error (disk full, permission denied, read-only) naks the messages
with back-off, is counted, and makes `ready()` false until a write succeeds again; the error
says which path, what the system said, and what to do.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import anyio
import orjson

from busway import (
    BatchError,
    BuildContext,
    ConfigError,
    DeliveryError,
    Duration,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    SinkConfig,
)
from busway.adapters.file._append import AppendWriter, Line
from busway.adapters.file._daemon import daemon_name
from busway.adapters.file._oserrors import delivery_error
from busway.adapters.file._per_message import PerMessageWriter, WriteFailed
from busway.adapters.file._template import MissingValue, PathTemplate

__all__ = ["FileSink", "FileSinkConfig"]

logger = logging.getLogger("busway.adapters.file")

_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
_DAEMON = "{daemon}"


def _daemon(config: FileSinkConfig) -> str:
    """This daemon's name if the paths use `{daemon}` (else "", and nothing is checked)."""
    if _DAEMON not in config.path and _DAEMON not in config.rotated_path:
        return ""
    try:
        return daemon_name()
    except ValueError as exc:
        raise ConfigError(f"{exc} (the path uses {_DAEMON})", path="$.path") from None


class FileSinkConfig(SinkConfig, tag="file", frozen=True, kw_only=True):
    """Where and how to write (relative paths start at the config file's directory)."""

    path: str
    """`append`: the live file; `per-message`: a template naming each message's file. Either
    may hold `{daemon}`, this daemon's name (`BUSWAY_DAEMON`, else the host name), so that
    several daemons on one config write files of their own."""
    mode: Literal["append", "per-message"] = "append"
    """`append`: JSON lines into one file; `per-message`: one file per message."""
    fsync: bool = True
    """fsync before the ack (once per batch in `append`): lines survive a power loss."""
    rotate_bytes: int | None = None
    """`append`: rotate before the live file grows past this many bytes."""
    rotate_every: Duration | None = None
    """`append`: rotate at the first write of each window of this length (clock-aligned)."""
    rotated_path: str = "{stem}-{start:%Y%m%dT%H%M%SZ}{suffix}"
    """`append`: where a rotated file goes, relative to the live file's directory (`{stem}`,
    `{suffix}`, `{name}`, `{start:...}`, `{end:...}` in UTC, `{daemon}`)."""
    index_size: int = 100_000
    """`append`: how many message ids (`Message.id`, the `Nats-Msg-Id`) the file remembers, the
    newest written to it across rotations and daemons: a message that comes again (redelivered,
    replayed, republished after the stream's duplicate window) while its id is among them is
    not written twice. At least `max_in_flight`; memory: about 130 bytes per id of 40
    characters (13 MB for the default).
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode == "per-message":
            PathTemplate(self.path)  # raises ValueError naming what is wrong
            if self.rotate_bytes is not None or self.rotate_every is not None:
                raise ValueError("rotate_bytes / rotate_every apply to mode = 'append' only")
        if self.rotate_bytes is not None and self.rotate_bytes < 1:
            raise ValueError("rotate_bytes must be at least 1")
        if self.rotate_every is not None and float(self.rotate_every) <= 0:
            raise ValueError("rotate_every must be positive")
        if self.mode == "append" and self.index_size < self.max_in_flight:
            raise ValueError(
                f"index_size ({self.index_size}) must be at least max_in_flight "
                f"({self.max_in_flight}): after a crash every un-acked message can come "
                "again, and the index must recognise each one that was already written"
            )
        try:
            self.rotated_path.format(
                stem="", suffix="", name="", start=_EPOCH, end=_EPOCH, daemon=""
            )
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"rotated_path {self.rotated_path!r}: {exc!r}; use {{stem}}, {{suffix}}, "
                "{name}, {start:%Y%m%d...}, {end:...} and {daemon}"
            ) from None


class FileSink(Sink):
    """Writes message bodies to files; durable (fsynced) before the batch is acked."""

    def __init__(self, config: FileSinkConfig, context: BuildContext) -> None:
        self.config = config
        self._healthy = True
        self._appender: AppendWriter | None = None
        self._template: PathTemplate | None = None
        self._writer: PerMessageWriter | None = None
        daemon = _daemon(config)
        if config.mode == "append":
            self.path: Path = context.resolve_path(config.path.replace(_DAEMON, daemon))
            self._appender = AppendWriter(
                self.path,
                fsync=config.fsync,
                rotate_bytes=config.rotate_bytes,
                rotate_every=float(config.rotate_every) if config.rotate_every else None,
                rotated_path=config.rotated_path,
                index_size=config.index_size,
                daemon=daemon,
            )
        else:
            self.path = context.base_dir
            self._template = PathTemplate(config.path, daemon=daemon)
            self._writer = PerMessageWriter(fsync=config.fsync)

    async def open(self) -> None:
        """Open the file now, to report a bad path at start-up; a failure here is not fatal.

        The path may become writable later (a volume mounted, space freed): messages wait,
        are retried with back-off, and readiness stays false until a write succeeds.
        """
        if self._appender is None:
            return
        try:
            await anyio.to_thread.run_sync(self._appender.open)
        except OSError as exc:
            self._healthy = False
            logger.warning("%s", delivery_error("open", self.path, exc))

    async def write(self, batch: Sequence[Message]) -> None:
        """Deliver `batch`; bodies that cannot be written fail on their own (BatchError)."""
        if self._appender is not None:
            await self._append(self._appender, batch)
        else:
            await self._write_files(batch)

    async def close(self) -> None:
        """Close the file."""
        if self._appender is not None:
            self._appender.close()

    def ready(self) -> bool:
        """False after a failed write, until a write succeeds again."""
        return self._healthy

    async def _append(self, appender: AppendWriter, batch: Sequence[Message]) -> None:
        entries: list[Line] = []
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
            line = (data if b"\n" not in data else orjson.dumps(document)) + b"\n"
            entries.append(Line(message.id, f"{message.stream}:{message.sequence}", line))
        if entries:
            try:
                await anyio.to_thread.run_sync(appender.write, entries)
            except OSError as exc:
                self._healthy = False
                raise delivery_error("write", self.path, exc) from exc
            self._healthy = True
        if failures:
            raise BatchError(failures)

    async def _write_files(self, batch: Sequence[Message]) -> None:
        assert self._template is not None
        assert self._writer is not None
        items: list[tuple[int, Path, bytes]] = []
        failures: dict[int, DeliveryError] = {}
        base = self.path
        for index, message in enumerate(batch):
            try:
                relative = self._template.render(message)
            except MissingValue as exc:
                failures[index] = PermanentError(
                    f"message {message.id} on {message.subject}: cannot name its file from "
                    f"{self._template.template!r}: {exc}"
                )
                continue
            items.append((index, base / relative, message.data))
        try:
            await anyio.to_thread.run_sync(self._writer.write, items)
        except WriteFailed as failed:
            self._healthy = False
            error = delivery_error(failed.action, failed.path, failed.error)
            logger.warning("%s", error)
            started = False
            for index, _, _ in items:
                if index == failed.index:
                    started = True
                    failures[index] = error
                elif started:  # not attempted: the batch stopped at the failure
                    failures[index] = RetryableError(f"not written yet: {error}")
        else:
            if items:
                self._healthy = True
        if failures:
            raise BatchError(failures)
