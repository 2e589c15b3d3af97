"""Publishing one claimed file: its records, pipelined, each with a deterministic message id.

Records are sent with `publish_pipelined` and their confirmations kept in a FIFO of at most
`window` entries; when it is full the oldest is awaited before the next record is sent. Memory
therefore depends on the window, not on the file, and since confirmations are awaited in file
order, the last one awaited marks a prefix of the file that is wholly stored. That prefix is
the *checkpoint*, saved in the source's durable state every `checkpoint_every` seconds, so a
restart resumes a large file near where it stopped instead of at the start (a seek for JSON
lines; CSV rows before it are parsed again but not published). What was published after the
last checkpoint is published again with the same ids and dropped by the stream.
"""

from __future__ import annotations

import datetime
import mimetypes
import time
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import BinaryIO, Literal, Protocol

import anyio
import orjson

from busway import ComponentStats, PublishAck, SourceContext
from busway.adapters.file._names import printable
from busway.adapters.file._records import (
    CsvReader,
    FileFormatError,
    JsonLinesReader,
    Record,
    RecordReader,
    WholeFileReader,
)

__all__ = ["FileFailed", "FilePublisher", "PublishedFile", "ReaderSettings"]

_BATCH = 512  # records read per worker-thread hop


class PublishedFile(Protocol):
    """What publishing needs of a file: a local `Claim`, or a remote file the `sftp` source
    downloaded. `identity` keys its checkpoint (letters and digits only); `message_key` goes
    into its message ids, `<source>:<message_key>:<record>`."""

    @property
    def name(self) -> str: ...

    @property
    def identity(self) -> str: ...

    @property
    def message_key(self) -> str: ...

    @property
    def size(self) -> int: ...

    @property
    def mtime_ns(self) -> int: ...

    def open(self) -> BinaryIO:
        """A reader of the file's bytes, from the start."""
        ...


class FileFailed(Exception):
    """The file goes to `failed/`; the message is what its `.error` file says."""


@dataclass(frozen=True, kw_only=True)
class ReaderSettings:
    """How to read files: the format and its options (from the source's config)."""

    format: Literal["jsonl", "csv", "whole"]
    encoding: str
    delimiter: str
    quotechar: str
    max_line: int
    max_size: int

    def reader(self, file: BinaryIO, start: tuple[int, int | None]) -> RecordReader:
        """A reader of the open `file`, resuming after record `start[0]` (at byte `start[1]`)."""
        number, offset = start
        if self.format == "jsonl":
            return JsonLinesReader(
                file, max_line=self.max_line, start_line=number, start_offset=offset or 0
            )
        if self.format == "csv":
            return CsvReader(
                file,
                encoding=self.encoding,
                delimiter=self.delimiter,
                quotechar=self.quotechar,
                start_row=number,
            )
        return WholeFileReader(file, max_size=self.max_size)


class FilePublisher:
    """Publishes claimed files for one source; see the module docstring for the protocol."""

    def __init__(
        self,
        *,
        subject: str,
        settings: ReaderSettings,
        dead_letter_bad: bool,
        window: int,
        checkpoint_every: float,
    ) -> None:
        self.subject = subject
        self.settings = settings
        self.dead_letter_bad = dead_letter_bad
        self.window = window
        self.checkpoint_every = checkpoint_every

    async def publish(self, claim: PublishedFile, context: SourceContext) -> None:
        """Publish every record of `claim` and await every PubAck; raises FileFailed.

        PublishError (JetStream did not confirm) propagates: the caller retries the file,
        which resumes from the checkpoint.
        """
        key = f"file.{claim.identity}"
        start = await self._load_checkpoint(context, key)
        try:
            if start[0] == 0 and not self.dead_letter_bad and self.settings.format != "whole":
                bad = await anyio.to_thread.run_sync(self._first_bad, claim)
                if bad is not None:
                    raise FileFailed(f"line {bad.line}: {bad.error}")
            with claim.open() as file:
                reader = self.settings.reader(file, start)
                await self._publish_records(claim, context, reader, key)
        except FileFormatError as exc:
            raise FileFailed(str(exc)) from None

    async def forget(self, claim: PublishedFile, context: SourceContext) -> None:
        """Drop the file's checkpoint once it is finished (moved to done/ or failed/)."""
        try:
            await context.state.delete(f"file.{claim.identity}")
        except Exception as exc:  # a leftover checkpoint is harmless: its file is gone
            context.logger.warning(
                "cannot delete the checkpoint of %s: %s", printable(claim.name), exc
            )

    async def _publish_records(
        self, claim: PublishedFile, context: SourceContext, reader: RecordReader, key: str
    ) -> None:
        stats = context.stats
        publish = context.publisher.publish_pipelined
        subject = self.subject
        prefix = f"{context.name}:{claim.message_key}:"
        base = self._base_headers(claim)
        row_header = self.settings.format == "csv"
        window = self.window
        pending: deque[tuple[int, int | None, Awaitable[PublishAck] | None]] = deque()
        last_saved = time.monotonic()
        done: tuple[int, int | None] = (0, None)
        while batch := await anyio.to_thread.run_sync(reader.read_batch, _BATCH):
            for record in batch:
                stats.received += 1
                if record.error is not None:
                    await self._dead_letter(claim, context, record)
                    pending.append((record.number, record.offset, None))
                else:
                    headers = {
                        **base,
                        "Nats-Msg-Id": prefix + str(record.number),
                        "Busway-File-Line": str(record.line),
                    }
                    if row_header:
                        headers["Busway-File-Row"] = str(record.number)
                    confirmation = await publish(subject, record.data, headers=headers)
                    pending.append((record.number, record.offset, confirmation))
                while len(pending) >= window:
                    done = await self._settle(pending, stats)
            if time.monotonic() - last_saved >= self.checkpoint_every and done[0]:
                await self._save_checkpoint(context, key, done)
                last_saved = time.monotonic()
        while pending:
            await self._settle(pending, stats)

    @staticmethod
    async def _settle(
        pending: deque[tuple[int, int | None, Awaitable[PublishAck] | None]],
        stats: ComponentStats,
    ) -> tuple[int, int | None]:
        number, offset, confirmation = pending.popleft()
        if confirmation is not None:
            await confirmation
            stats.published += 1
        return number, offset

    def _base_headers(self, claim: PublishedFile) -> dict[str, str]:
        headers = {"Busway-File": claim.name}
        if self.settings.format == "whole":
            mtime = datetime.datetime.fromtimestamp(claim.mtime_ns / 1e9, tz=datetime.UTC)
            headers["Busway-File-Size"] = str(claim.size)
            headers["Busway-File-Mtime"] = mtime.isoformat().replace("+00:00", "Z")
            headers["Content-Type"] = (
                mimetypes.guess_type(claim.name)[0] or "application/octet-stream"
            )
        else:
            headers["Content-Type"] = "application/json"
        return headers

    async def _dead_letter(
        self, claim: PublishedFile, context: SourceContext, record: Record
    ) -> None:
        origin = f"{claim.name}:{record.line}"
        await context.dead_letter(
            record.data,
            reason="bad_line",
            error=f"{origin}: {record.error}",
            origin=origin,
            headers={
                "Busway-File": claim.name,
                "Busway-File-Line": str(record.line),
                "Busway-File-Row": str(record.number),
            },
            message_id=f"{claim.identity}:{record.number}",
        )

    def _first_bad(self, claim: PublishedFile) -> Record | None:
        """The first bad record of the file (a read-only pass before anything is published)."""
        with claim.open() as file:
            reader = self.settings.reader(file, (0, None))
            while batch := reader.read_batch(_BATCH * 8):
                for record in batch:
                    if record.error is not None:
                        return record
        return None

    @staticmethod
    async def _load_checkpoint(context: SourceContext, key: str) -> tuple[int, int | None]:
        raw = await context.state.get(key)
        if raw is None:
            return (0, None)
        saved = orjson.loads(raw)
        return (int(saved["number"]), saved.get("offset"))

    @staticmethod
    async def _save_checkpoint(
        context: SourceContext, key: str, done: tuple[int, int | None]
    ) -> None:
        try:
            await context.state.put(key, orjson.dumps({"number": done[0], "offset": done[1]}))
        except Exception as exc:  # only an optimisation: a resume without it starts earlier
            context.logger.warning("cannot save a checkpoint: %s", exc)
