"""The `file` source: a watched inbox directory whose files become messages.

    [[sources]]
    name = "orders-inbox"
    type = "file"
    path = "var/inbox"            # the inbox; processing/, done/, failed/ are made inside it
    patterns = ["*.jsonl"]
    format = "jsonl"              # or "csv", "whole"
    subject = "orders.received"

The inbox is watched with `watchfiles` (inotify on Linux) and also listed in full at start-up
and every `rescan`, so a file is found even when events are lost (a full event queue, a
network file system that sends none). A file is taken once it is complete (see `ready`),
claimed by a rename into `processing/` and locked there (see `_claim`), published record by
record with deterministic message ids (see `_publishing`), and moved to `done/` (or deleted)
only after JetStream confirmed every record. A file that cannot be published goes to
`failed/` with a `<name>.error` file; bad records alone go to the dead-letter subject with
their file name and line, or fail the whole file (`on_error`).
"""

from __future__ import annotations

import codecs
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeVar

import anyio
import msgspec
from anyio.abc import TaskGroup, TaskStatus

from busway import (
    BuildContext,
    Duration,
    PublishError,
    Source,
    SourceConfig,
    SourceContext,
    StartupError,
)
from busway.adapters.file._claim import Claim, FileVanished, Inbox
from busway.adapters.file._names import printable, unusable
from busway.adapters.file._publishing import FileFailed, FilePublisher, ReaderSettings
from busway.adapters.file._ready import ReadyTracker
from busway.adapters.file._watch import watch_directory

__all__ = ["FileCounters", "FileSource", "FileSourceConfig"]

_RETRY_FIRST, _RETRY_MAX = 0.5, 30.0
_T = TypeVar("_T")


class FileSourceConfig(SourceConfig, tag="file", frozen=True, kw_only=True):
    """A watched inbox directory (relative paths start at the config file's directory)."""

    path: str
    """The inbox directory, created if missing; an inbox that cannot be created or written
    stops start-up with the path and the system's error."""
    patterns: list[str] = msgspec.field(default_factory=lambda: ["*"])
    """Globs on file names (`["*.jsonl"]`); dot-files never match."""
    format: Literal["jsonl", "csv", "whole"] = "jsonl"
    """`jsonl`: one message per non-blank JSON line; `csv`: one JSON object per data row,
    keyed by the header row; `whole`: the file's bytes as one message."""
    ready: Literal["stable", "marker", "rename"] = "stable"
    """When a file is complete: `stable` (size and mtime unchanged for `stable_for`),
    `marker` (a `<name><marker_suffix>` file appears) or `rename` (writers rename complete
    files into place)."""
    stable_for: Duration = Duration(2.0)
    """`ready = "stable"`: how long a file must stay unchanged (a file already older is taken
    at once); raise it for writers that pause mid-file."""
    marker_suffix: str = ".done"
    """`ready = "marker"`: suffix of the marker file (starts with `.`), removed after the
    claim."""
    rescan: Duration = Duration(30.0)
    """Interval of the full directory scan behind the file-system events, so a lost event
    delays a file, never loses it."""
    on_done: Literal["move", "delete"] = "move"
    """After every record's PubAck: move the file to `done` or delete it."""
    on_error: Literal["dead-letter", "fail-file"] = "dead-letter"
    """Bad records: `dead-letter` each and publish the rest, or `fail-file`: check the file
    first and move it to `failed` (with `<name>.error`) at the first bad record, publishing
    nothing."""
    processing: str = "processing"
    """Folder (relative to the inbox, on its file system) where a claimed file is moved and
    locked while it is published."""
    done: str = "done"
    """Folder (relative to the inbox, on its file system) for published files
    (`on_done = "move"`)."""
    failed: str = "failed"
    """Folder (relative to the inbox, on its file system) for files that failed, beside
    `<name>.error` saying why."""
    encoding: str = "utf-8-sig"
    """`csv`: text encoding of the file (the default skips a UTF-8 BOM)."""
    delimiter: str = ","
    """`csv`: field separator, one character."""
    quotechar: str = '"'
    """`csv`: quote character, one character; quoted fields may hold delimiters, quotes and
    newlines."""
    max_line: int = 1024 * 1024
    """`jsonl`: longest line in bytes; a longer one is a bad record."""
    max_size: int = 1024 * 1024
    """`whole`: largest file in bytes; a larger one fails."""
    window: int = 1024
    """PubAcks awaited at once while a file is published (memory stays flat whatever the
    file size)."""
    concurrency: int = 1
    """Files published at once."""
    checkpoint_every: Duration = Duration(1.0)
    """How often the position confirmed so far is saved in the state bucket; a restart
    resumes there and the stream drops what is published twice."""

    def __post_init__(self) -> None:
        if not self.patterns:
            raise ValueError("patterns must name at least one glob, e.g. ['*.jsonl']")
        if len(self.delimiter) != 1 or len(self.quotechar) != 1:
            raise ValueError("delimiter and quotechar must be one character each")
        try:
            codecs.lookup(self.encoding)
        except LookupError:
            raise ValueError(f"unknown encoding {self.encoding!r}") from None
        if not self.marker_suffix.startswith("."):
            raise ValueError("marker_suffix must start with '.', e.g. '.done'")
        for key in ("max_line", "max_size", "window", "concurrency"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1")
        if float(self.rescan) <= 0:
            raise ValueError("rescan must be positive")


@dataclass
class FileCounters:
    """File-level counters, beside the engine's per-message ones (`context.stats`)."""

    seen: int = 0
    claimed: int = 0
    resumed: int = 0
    done: int = 0
    failed: int = 0
    bytes: int = 0


class FileSource(Source):
    """Publishes the records of every complete file dropped into the inbox."""

    def __init__(self, config: FileSourceConfig, context: BuildContext) -> None:
        self.config = config
        self._context = context
        self.inbox_path = context.resolve_path(config.path)
        done = None if config.on_done == "delete" else self._folder(config.done)
        self.inbox = Inbox(
            self.inbox_path,
            processing=self._folder(config.processing),
            done=done,
            failed=self._folder(config.failed),
            marker_suffix=config.marker_suffix if config.ready == "marker" else None,
        )
        self.tracker = ReadyTracker(
            self.inbox_path,
            patterns=config.patterns,
            mode=config.ready,
            stable_for=float(config.stable_for),
            marker_suffix=config.marker_suffix,
        )
        self.publisher = FilePublisher(
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
        self.files = FileCounters()
        self._active: set[str] = set()
        self._changed: set[str] = set()
        self._wake = anyio.Event()
        self._slots = anyio.Semaphore(config.concurrency)

    def _folder(self, path: str) -> Path:
        return self._context.resolve_path(str(self.inbox_path / Path(path).expanduser()))

    def _count(self, context: SourceContext, what: str, amount: int) -> None:
        """Count on the source (tests read it) and in the metrics (`busway_events_total`)."""
        setattr(self.files, what, getattr(self.files, what) + amount)
        context.stats.count(f"files_{what}", amount)

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Prepare the folders (or refuse to start), then watch and publish until cancelled."""
        try:
            await anyio.to_thread.run_sync(self.inbox.prepare)
        except OSError as exc:
            raise StartupError(
                f"file source {context.name!r}: cannot use inbox {self.inbox_path}: "
                f"{exc.strerror or exc} ({exc.filename or self.inbox_path}); the inbox and its "
                "processing/done/failed folders must be directories the busway user can write"
            ) from None
        context.logger.info(
            "watching %s for %s (%s, ready=%s) -> %s",
            self.inbox_path,
            " ".join(self.config.patterns),
            self.config.format,
            self.config.ready,
            self.config.subject,
        )
        stop = anyio.Event()
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch_directory, self.inbox_path, stop, self._on_change, context.logger)
            try:
                task_status.started()
                await self._scan_forever(tg, context)
            finally:
                stop.set()  # lets the watcher's thread return now rather than at its timeout

    def _on_change(self, names: set[str]) -> None:
        self._changed.update(names)
        self._wake.set()

    async def _scan_forever(self, tg: TaskGroup, context: SourceContext) -> None:
        rescan = float(self.config.rescan)
        next_rescan = 0.0
        while True:
            self._wake = anyio.Event()
            changed, self._changed = self._changed, set()
            if time.monotonic() >= next_rescan:
                next_rescan = time.monotonic() + rescan
                await self._adopt_orphans(tg, context)
                ready = await self._blocking(context, self.tracker.scan)
            else:
                ready = await self._blocking(context, self.tracker.check, changed)
            self._report_refused(context)
            for name in ready or ():
                if name not in self._active:
                    await self._claim(tg, context, name)
            waits = [next_rescan - time.monotonic(), self.tracker.next_check() or math.inf]
            with anyio.move_on_after(max(0.01, min(waits))):
                await self._wake.wait()

    def _report_refused(self, context: SourceContext) -> None:
        """Log (once each) matching entries that are not regular files, left where they are."""
        refused, self.tracker.refused = self.tracker.refused, []
        for name, kind in refused:
            context.stats.count_error("not_a_file")
            context.logger.warning(
                "%s in %s is %s, not a regular file: left where it is (the source takes "
                "regular files only: drop the file itself, not a link to it)",
                printable(name),
                self.inbox_path,
                kind,
            )

    def _report_unopenable(self, context: SourceContext) -> None:
        """Log and count files that could not be opened (moved to failed/ by the inbox)."""
        refused, self.inbox.refused = self.inbox.refused, []
        for file in refused:
            context.stats.count_error("unreadable")
            if file.target is not None:
                self._count(context, "failed", 1)
            context.logger.warning(
                "%s cannot be opened: %s (give the busway user read access and drop it "
                "into the inbox again) -> %s",
                printable(file.name),
                file.error.strerror or file.error,
                printable(file.target) if file.target else "left in processing/",
            )

    async def _adopt_orphans(self, tg: TaskGroup, context: SourceContext) -> None:
        """Resume files left in processing/ by a daemon that died (their lock is free)."""
        orphans = await self._blocking(context, self.inbox.orphans, set(self._active)) or []
        self._report_unopenable(context)
        try:
            while orphans:
                await self._slots.acquire()
                claim = orphans.pop(0)
                context.logger.info(
                    "resuming %s, left in processing/ by a stopped daemon", printable(claim.name)
                )
                self._count(context, "resumed", 1)
                self._start(tg, context, claim)
        finally:
            for claim in orphans:  # cancelled while waiting for a slot: let go of their locks
                claim.release()

    async def _claim(self, tg: TaskGroup, context: SourceContext, name: str) -> None:
        self._count(context, "seen", 1)
        await self._slots.acquire()
        try:
            claim = await anyio.to_thread.run_sync(self.inbox.claim, name)
        except OSError as exc:
            self._slots.release()
            context.stats.count_error("claim")
            context.logger.warning("cannot claim %s: %s", printable(name), printable(exc))
            return
        except BaseException:
            self._slots.release()
            raise
        self._report_unopenable(context)
        if not isinstance(claim, Claim):
            self._slots.release()  # taken by another daemon, or a namesake still in progress
            return
        self._count(context, "claimed", 1)
        self._start(tg, context, claim)

    def _start(self, tg: TaskGroup, context: SourceContext, claim: Claim) -> None:
        self._active.add(claim.name)
        tg.start_soon(self._process, context, claim, name=f"file {printable(claim.name)}")

    async def _process(self, context: SourceContext, claim: Claim) -> None:
        """Publish the file until it is done or failed; retry while JetStream is away."""
        try:
            unfit = unusable(claim.name)
            if unfit is not None:
                # Its name cannot go into the Busway-File header: nothing is published.
                await self._settle(
                    context, claim, failure=f"{unfit}: rename it and drop it into the inbox again"
                )
                return
            delay = _RETRY_FIRST
            while True:
                try:
                    await self.publisher.publish(claim, context)
                except PublishError as exc:
                    context.stats.count_error("publish")
                    context.logger.warning(
                        "%s: not confirmed by JetStream (%s); retrying in %.1fs from its last "
                        "checkpoint",
                        printable(claim.name),
                        exc,
                        delay,
                    )
                    await anyio.sleep(delay)
                    delay = min(delay * 2, _RETRY_MAX)
                    continue
                except FileFailed as exc:
                    await self._settle(context, claim, failure=str(exc))
                    return
                await self._settle(context, claim, failure=None)
                return
        finally:
            claim.release()
            self._active.discard(claim.name)
            self._slots.release()

    async def _settle(self, context: SourceContext, claim: Claim, *, failure: str | None) -> None:
        """Move the file to done/ or failed/, retrying while the file system refuses."""
        delay = _RETRY_FIRST
        name = printable(claim.name)
        while True:
            try:
                if failure is None:
                    target = await anyio.to_thread.run_sync(self.inbox.finish, claim)
                else:
                    explanation = _explain_failure(claim, failure)
                    target = await anyio.to_thread.run_sync(self.inbox.fail, claim, explanation)
            except FileVanished:
                # Removed from processing/ by someone else while it was published: its
                # records are all confirmed (or it failed) all the same; nothing is left to move.
                context.stats.count_error("vanished")
                context.logger.warning(
                    "%s was removed from processing/ by another program before busway could "
                    "move it to %s; busway read it through its open descriptor, so %s",
                    name,
                    "done/" if failure is None else "failed/",
                    "every record is published"
                    if failure is None
                    else "only its .error file is in failed/",
                )
                target = None
            except OSError as exc:
                context.stats.count_error("move")
                context.logger.warning(
                    "%s is %s but cannot be moved out of processing/: %s; retrying",
                    name,
                    "published" if failure is None else "failed",
                    printable(exc),
                )
                await anyio.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX)
                continue
            break
        await self.publisher.forget(claim, context)
        where = printable(target) if target is not None else "(gone)"
        if failure is None:
            self._count(context, "done", 1)
            self._count(context, "bytes", claim.size)
            context.logger.info("%s done (%d bytes) -> %s", name, claim.size, where)
        else:
            self._count(context, "failed", 1)
            context.stats.count_error("bad_file")
            context.logger.warning("%s failed: %s -> %s", name, failure, where)

    async def _blocking(
        self, context: SourceContext, function: Callable[..., _T], *args: object
    ) -> _T | None:
        """`function(*args)` in a worker thread; an OSError is logged and counted, not fatal."""
        try:
            return await anyio.to_thread.run_sync(function, *args)
        except OSError as exc:
            context.stats.count_error("scan")
            context.logger.warning("cannot scan %s: %s", self.inbox_path, exc)
            return None


def _explain_failure(claim: Claim, failure: str) -> str:
    """The text of a failed file's `.error` file."""
    return (
        f"file: {printable(claim.name)}\n"
        f"size: {claim.size}\n"
        f"error: {failure}\n"
        "what to do: fix the file and drop it into the inbox again "
        "(it is a new file then, so its records are published anew)\n"
    )
