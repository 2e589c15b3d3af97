"""The `sftp` source: files in a remote directory become messages, as the `file` source does.

    [[sources]]
    name = "partner-orders"
    type = "sftp"
    subject = "orders.received"
    path = "/outbox"              # remote directory; processing/, done/, failed/ inside it
    patterns = ["*.jsonl"]
    format = "jsonl"              # or "csv", "whole": read exactly as the file source reads
    [sources.server]
    host = "sftp.partner.example"
    username = "busway"
    private_key = "keys/partner_ed25519"

Every `interval` the directory is listed. A file is taken once its size and modification time
stayed the same for `stable_for`, and claimed by renaming it into `processing/`: an SFTP
rename is atomic on the server and refuses an existing target, so of several daemons (or a
partner's cleanup job) exactly one gets each file. With several daemons only the holder of
the source's lease polls at all, so files in `processing/` left by a crashed daemon are
resumed by the next holder rather than read twice at once.

A claimed file is downloaded to a local temporary file and published with the `file`
source's readers and publisher (`busway.adapters.file._publishing`): the same formats, bad
records dead-lettered with their line, the checkpoint in the source's state bucket, so a
restart resumes a large file near where it stopped. Message ids are
`<source>:<remote path>@<mtime>:<record>`: they name the upstream file, stay the same when the
file is resumed or put back, and differ when a partner uploads a new file under an old name.
Only after every PubAck is the file moved to `done/` (or deleted); a file that cannot be read
goes to `failed/` beside `<name>.error` saying why. A lost connection leaves the file in
`processing/`, to be resumed on the next poll.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Literal
from urllib.parse import quote

import anyio
import msgspec
from anyio.abc import TaskStatus

from busway import (
    BuildContext,
    DeliveryError,
    Duration,
    Source,
    SourceConfig,
    SourceContext,
    StartupError,
)
from busway.adapters.file._names import printable, unusable
from busway.adapters.file._publishing import FileFailed, FilePublisher, ReaderSettings
from busway.adapters.sftp._server import (
    REGULAR_FILE,
    RemoteError,
    SftpClient,
    SftpServerConfig,
    SshServer,
    mapped,
)

__all__ = ["SftpSource", "SftpSourceConfig"]

_MAX_BACKOFF = 30.0


class SftpSourceConfig(SourceConfig, tag="sftp", frozen=True, kw_only=True):
    """A remote directory polled over SFTP; its files are read as the `file` source reads."""

    server: SftpServerConfig
    """The SSH server and the account: `[sources.server]`."""
    path: str
    """The remote directory (absolute, or relative to the account's home); `processing/`,
    `done/` and `failed/` are created inside it."""
    patterns: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Globs on file names (`["*.jsonl"]`); dot-files never match."""
    format: Literal["jsonl", "csv", "whole"] = "jsonl"
    """`jsonl`: one message per non-blank JSON line; `csv`: one JSON object per data row,
    keyed by the header row; `whole`: the file's bytes as one message."""
    interval: Duration = Duration(5.0)
    """How often the remote directory is listed."""
    stable_for: Duration = Duration(2.0)
    """A file is taken once its size and modification time stayed the same this long (0:
    at first sight, for partners that upload under a temporary name and rename)."""
    on_done: Literal["move", "delete"] = "move"
    """After every record's PubAck: move the file to `done` or delete it."""
    on_error: Literal["dead-letter", "fail-file"] = "dead-letter"
    """Bad records: `dead-letter` each and publish the rest, or `fail-file`: move the file to
    `failed` at the first bad record, publishing nothing."""
    processing: str = "processing"
    """Remote folder (relative to `path`) a claimed file is renamed into while published."""
    done: str = "done"
    """Remote folder (relative to `path`) for published files (`on_done = "move"`)."""
    failed: str = "failed"
    """Remote folder (relative to `path`) for files that failed, beside `<name>.error`."""
    encoding: str = "utf-8-sig"
    """`csv`: text encoding of the file (the default skips a UTF-8 BOM)."""
    delimiter: str = ","
    """`csv`: field separator, one character."""
    quotechar: str = '"'
    """`csv`: quote character, one character."""
    max_line: int = 1024 * 1024
    """`jsonl`: longest line in bytes; a longer one is a bad record."""
    max_size: int = 1024 * 1024
    """`whole`: largest file in bytes; a larger one fails."""
    window: int = 1024
    """PubAcks awaited at once while a file is published."""
    checkpoint_every: Duration = Duration(1.0)
    """How often the position confirmed so far is saved in the state bucket."""
    lease_ttl: Duration = Duration(10.0)
    """With several daemons one polls, holding a lease renewed every quarter of this; when it
    dies another takes over within 1.5 times this."""
    spool_dir: str | None = None
    """Local directory for downloaded files while they are published (default: the system's
    temporary directory); needs room for the largest file."""

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ValueError("patterns must name at least one glob, e.g. ['*.jsonl']")
        if len(self.delimiter) != 1 or len(self.quotechar) != 1:
            raise ValueError("delimiter and quotechar must be one character each")
        for key in ("max_line", "max_size", "window"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1")
        if float(self.interval) <= 0:
            raise ValueError("interval must be positive")
        if float(self.lease_ttl) < 0.2:
            raise ValueError("lease_ttl must be at least 200ms")
        for key in ("processing", "done", "failed"):
            folder = getattr(self, key)
            if not folder or "/" in folder or folder in (".", ".."):
                raise ValueError(f"{key} must be a plain folder name inside path")


@dataclass(slots=True)
class RemoteFile:
    """A claimed remote file, downloaded to `local`; what `FilePublisher` publishes."""

    name: str
    """The file's remote path where the partner left it (dead letters and headers show it)."""
    size: int
    mtime_ns: int
    local: Path
    identity: str = field(init=False)
    message_key: str = field(init=False)

    def __post_init__(self) -> None:
        upstream = f"{self.name}@{self.mtime_ns // 1_000_000_000}"
        self.message_key = quote(upstream, safe="/@._-~+=,")
        self.identity = hashlib.sha256(upstream.encode("utf-8", "surrogateescape")).hexdigest()[:24]

    def open(self) -> BinaryIO:
        """The downloaded bytes."""
        return open(self.local, "rb")


@dataclass(slots=True)
class _Seen:
    size: int
    mtime: int
    since: float


class SftpSource(Source):
    """Polls a remote directory over SFTP; see the module docstring for the protocol."""

    def __init__(self, config: SftpSourceConfig, context: BuildContext) -> None:
        self.config = config
        self.server = SshServer(config.server, context)
        self.spool = context.resolve_path(config.spool_dir) if config.spool_dir else None
        self._publisher = FilePublisher(
            subject=config.subject,
            settings=ReaderSettings(
                format=config.format,
                encoding=config.encoding,
                delimiter=config.delimiter,
                quotechar=config.quotechar,
                max_line=config.max_line,
                max_size=config.max_size,
            ),
            dead_letter_bad=config.on_error == "dead-letter",
            window=config.window,
            checkpoint_every=float(config.checkpoint_every),
        )
        self._seen: dict[str, _Seen] = {}
        self.published_files = 0
        self.failed_files = 0

    def _folder(self, name: str) -> str:
        return posixpath.join(self.config.path, name)

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Check the login once (a wrong key or host key stops start-up), then poll as leader.

        An unreachable server at start is not fatal: it is logged and polled with back-off,
        since partners' servers come and go and the stream loses nothing by waiting.
        """
        try:
            async with self.server.session() as sftp:
                await self._prepare(sftp)
        except DeliveryError as exc:
            context.logger.warning("%s not reachable yet, will retry: %s", self.server.label, exc)
            context.stats.ready = False
        task_status.started()
        while True:
            async with context.lease(ttl=float(self.config.lease_ttl)):
                await self._poll_forever(context)

    async def _prepare(self, sftp: SftpClient) -> None:
        with mapped(self.server.label, f"checking {self.config.path}"):
            if not await sftp.isdir(self.config.path):
                raise StartupError(
                    f"{self.server.label}: remote path {self.config.path!r} is not a directory; "
                    "create it or fix `path`"
                )
            for name in (self.config.processing, self.config.done, self.config.failed):
                await sftp.makedirs(self._folder(name), exist_ok=True)

    async def _poll_forever(self, context: SourceContext) -> None:
        backoff = 0.0
        while True:
            try:
                async with self.server.session() as sftp:
                    await self._prepare(sftp)
                    backoff = 0.0
                    context.stats.ready = True
                    while True:
                        await self._poll(sftp, context)
                        await anyio.sleep(float(self.config.interval))
            except StartupError as exc:
                # The key or host key went bad while running: nothing to do but say so loudly.
                context.stats.ready = False
                context.stats.count_error("auth")
                context.logger.error("%s", exc)
                backoff = _MAX_BACKOFF
            except Exception as exc:  # a source must outlive any one failure
                context.stats.ready = False
                expected = isinstance(exc, DeliveryError | RemoteError)
                context.stats.count_error("retryable" if expected else "source_error")
                backoff = min(_MAX_BACKOFF, max(0.5, backoff * 2))
                log = context.logger.warning if expected else context.logger.exception
                log("poll failed, retrying in %.1fs: %s", backoff, exc)
            await anyio.sleep(backoff)

    async def _poll(self, sftp: SftpClient, context: SourceContext) -> None:
        """Resume files left in processing/, then claim and publish the new ones."""
        label = self.server.label
        processing = self._folder(self.config.processing)
        with mapped(label, f"listing {processing}"):
            for name in sorted(await sftp.listdir(processing)):
                if not name.startswith("."):
                    await self._publish(sftp, context, name)
        for name in await self._ready_names(sftp):
            source = posixpath.join(self.config.path, name)
            try:
                with mapped(label, f"claiming {source}"):
                    await sftp.rename(source, posixpath.join(processing, name))
            except RemoteError as exc:
                # Taken by another reader, or a file of that name is still in processing/.
                context.logger.info("not claimed now: %s", exc)
                continue
            self._seen.pop(name, None)
            await self._publish(sftp, context, name)

    async def _ready_names(self, sftp: SftpClient) -> list[str]:
        """Regular files matching the patterns whose size and mtime held for `stable_for`."""
        now = time.monotonic()
        with mapped(self.server.label, f"listing {self.config.path}"):
            entries = await sftp.readdir(self.config.path)
        ready: list[str] = []
        present: set[str] = set()
        for entry in entries:
            name = entry.filename
            attrs = entry.attrs
            if not isinstance(name, str) or name.startswith(".") or attrs.type != REGULAR_FILE:
                continue
            if not any(fnmatch.fnmatchcase(name, glob) for glob in self.config.patterns):
                continue
            present.add(name)
            size, mtime = attrs.size or 0, attrs.mtime or 0
            seen = self._seen.get(name)
            if seen is None or (seen.size, seen.mtime) != (size, mtime):
                seen = self._seen[name] = _Seen(size, mtime, now)
            if now - seen.since >= float(self.config.stable_for):
                ready.append(name)
        for gone in set(self._seen) - present:
            del self._seen[gone]
        return sorted(ready)

    async def _publish(self, sftp: SftpClient, context: SourceContext, name: str) -> None:
        """Publish processing/`name`, then move it on; a connection error leaves it there."""
        label = self.server.label
        claimed = posixpath.join(self._folder(self.config.processing), name)
        original = posixpath.join(self.config.path, name)
        if (why := unusable(name)) is not None:
            await self._finish(
                sftp, context, name, failed=f"cannot publish {printable(name)}: {why}"
            )
            return
        with mapped(label, f"reading {claimed}"):
            attrs = await sftp.stat(claimed)
        spool = tempfile.mkdtemp(prefix="busway-sftp-", dir=self.spool)
        try:
            local = Path(spool) / "file"
            with mapped(label, f"downloading {claimed}"):
                await sftp.get(claimed, str(local))
            remote = RemoteFile(
                name=original,
                size=attrs.size or 0,
                mtime_ns=(attrs.mtime or 0) * 1_000_000_000,
                local=local,
            )
            try:
                await self._publisher.publish(remote, context)
            except FileFailed as exc:
                await self._finish(sftp, context, name, failed=str(exc))
                await self._publisher.forget(remote, context)
                return
            await self._finish(sftp, context, name, failed=None)
            await self._publisher.forget(remote, context)
        finally:
            await anyio.to_thread.run_sync(_remove_tree, spool)

    async def _finish(
        self, sftp: SftpClient, context: SourceContext, name: str, *, failed: str | None
    ) -> None:
        label = self.server.label
        claimed = posixpath.join(self._folder(self.config.processing), name)
        if failed is None and self.config.on_done == "delete":
            with mapped(label, f"deleting {claimed}"):
                await sftp.remove(claimed)
            self.published_files += 1
            return
        folder = self._folder(self.config.failed if failed is not None else self.config.done)
        target = posixpath.join(folder, name)
        with mapped(label, f"moving {claimed} to {folder}"):
            if failed is not None:
                async with sftp.open(target + ".error", "wb") as error_file:
                    await error_file.write((failed + "\n").encode())
            await sftp.posix_rename(claimed, target)  # replaces an older file of that name
        if failed is None:
            self.published_files += 1
            return
        self.failed_files += 1
        context.stats.count_error("file_failed")
        context.stats.note_error(f"file_failed: {failed} ({printable(name)})")
        context.logger.warning("%s moved to %s: %s", printable(name), folder, failed)


def _remove_tree(path: str) -> None:
    for entry in os.scandir(path):
        os.unlink(entry.path)
    os.rmdir(path)
