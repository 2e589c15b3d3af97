"""The append writer: JSON lines into one live file, rotated by size or time, never doubled.

Beside the live file `orders.jsonl` lives its index `orders.jsonl.ids` (format in `_index`).
A batch is written as: its intent (range, CRC-32, ids) appended to the index, its bytes
written to the live file, one fsync of the live file; then the sink returns and the engine
acks. One fsync per batch: the live file's is the commit point, the index rides on it.

* A crash (SIGKILL) before the batch's bytes are all written leaves an intent whose bytes are
  short or differ: opening the file again truncates them away and forgets the intent's ids, so
  the redelivered messages are written once.
* A crash after the bytes, before the ack, redelivers messages whose ids the index holds:
  they are skipped, not written twice.

The ids are `Message.id`s, which a redelivery keeps, and so do a replayed dead letter and a
message a source publishes again after the stream's duplicate window (a resume from an old
checkpoint). The index remembers the newest `index_size` of them whatever file they went to
(a redelivery after a crash concerns at most `max_in_flight` messages; a replay is caught as
long as fewer than `index_size` messages were written since the original); when its file grows
past twice that it is compacted. An index of an earlier version, keyed by
`<stream>:<sequence>`, is read as such and rewritten in the current format (see `_index`).

Rotation renames the live file to `rotated_path`, a template relative to the live file's
directory with `{stem}`, `{suffix}`, `{name}`, `{daemon}` and the segment's `{start}` / `{end}`
as UTC datetimes (`{start:%Y%m%d}`), so a rotated file appears complete, at once, under its final
name. An existing name is never replaced (`.1`, `.2`... are appended). The rename comes
first; the index then starts a new segment that carries the ids over, and only then is the
new live file created. A crash at any step leaves either the old live file with its index,
or no live file and an index whose ids are all still valid: opening starts the new segment
from there, so the messages of the rotated file are recognised when they come back.

Several writers (two daemons, or two sinks, on one path) take turns: every open, batch and
rotation runs under an exclusive `flock` on `<live file>.lock`, a file that is never renamed
or replaced, so the lock outlives rotations and compactions. Under the lock a writer first
catches up with what the others did since its last turn: if the live file or the index is
another file now (rotated, compacted) or a tail it cannot follow (an intent cut by a crash),
it opens both again as after a crash; otherwise it reads the intents appended to the index
since its turn, so its end offset and its ids include the other writers' batches: the next
batch goes after theirs, and a message one writer wrote is skipped when it comes again to
another. The kernel drops the lock of a writer that dies, SIGKILL included. Locks are local
to one kernel: writers on different hosts sharing a network file system need coherent locks
(NFSv4), or per-daemon file names.

After a power loss (not a process crash) the index may lack its newest intents while the
live file, fsynced, has their lines: those complete lines are kept (they may have been
acked), so such a loss can at worst duplicate the last batch, never lose an acked line.

Every method blocks: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import orjson

from busway.adapters.file._index import (
    INTENT_VERSION,
    IndexState,
    Intent,
    carry_lines,
    header_line,
    intent_holds,
    intent_line,
    read_index,
)

__all__ = ["AppendWriter", "Line", "Segment"]

logger = logging.getLogger("busway.adapters.file")


class Line(NamedTuple):
    """One message's line, with what recognises the message when it comes again."""

    id: str
    """`Message.id`: the key the index remembers."""
    sequence: str
    """`<stream>:<sequence>`: matched only against the keys of an index of an earlier version."""
    data: bytes
    """The JSON line, newline included."""


class Segment:
    """A rotated-away file: where it went."""

    def __init__(self, path: Path) -> None:
        self.path = path


class AppendWriter:
    """Appends batches of (id, line) to the live file; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        fsync: bool,
        rotate_bytes: int | None,
        rotate_every: float | None,
        rotated_path: str,
        index_size: int,
        daemon: str = "",
    ) -> None:
        self.path = path
        self.daemon = daemon
        self.index_path = path.with_name(path.name + ".ids")
        self.lock_path = path.with_name(path.name + ".lock")
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes
        self.rotate_every = rotate_every
        self.rotated_path = rotated_path
        self.index_size = index_size
        self._fd: int | None = None
        self._index_fd: int | None = None
        self._end = 0
        self._start = 0.0
        self._ids: dict[str, bool] = {}
        """Remembered ids, oldest first: True for a sequence key of an earlier version."""
        self._index_entries = 0
        self._lock_fd: int | None = None
        self._index_known = 0
        """The index's size after this writer's last turn: what it has read or written."""

    # -- taking turns ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _turn(self) -> Iterator[None]:
        """Hold the path's exclusive lock, caught up with the other writers' batches."""
        if self._lock_fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        try:
            if self._fd is not None and not self._caught_up():
                self.close_files()
            if self._fd is None:
                self._open_locked()
            yield
            if self._index_fd is not None:
                self._index_known = os.fstat(self._index_fd).st_size
        finally:
            if self._lock_fd is not None:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _caught_up(self) -> bool:
        """Follow the other writers' batches since this writer's last turn; False: reopen."""
        assert self._fd is not None
        assert self._index_fd is not None
        try:
            live, index = os.stat(self.path), os.stat(self.index_path)
        except FileNotFoundError:
            return False
        if (live.st_ino, index.st_ino) != (
            os.fstat(self._fd).st_ino,
            os.fstat(self._index_fd).st_ino,
        ):
            return False  # rotated or compacted by another writer
        if index.st_size == self._index_known and live.st_size == self._end:
            return True  # nobody else wrote
        with open(self.index_path, "rb") as file:
            file.seek(self._index_known)
            tail = file.read(index.st_size - self._index_known)
        intents: list[Intent] = []
        for line in tail.splitlines():
            try:
                entry = orjson.loads(line)
                intents.append(Intent(entry["at"], entry["end"], entry["crc"], entry["ids"]))
            except (orjson.JSONDecodeError, KeyError, TypeError):
                return False  # torn by a crash, or not an intent: recover as after a crash
        end = self._end
        for intent in intents:
            if intent.at != end:
                return False
            end = intent.end
        if end != live.st_size or (intents and not intent_holds(self._fd, intents[-1], end)):
            return False  # a batch cut by its writer's crash
        for intent in intents:
            for key in intent.ids:
                self._ids.pop(key, None)
                self._ids[key] = False
            self._index_entries += len(intent.ids)
        while len(self._ids) > self.index_size:
            del self._ids[next(iter(self._ids))]
        self._end = end
        return True

    # -- opening and recovery ------------------------------------------------------------

    def open(self) -> None:
        """Open (or recover) the live file and its index; raises OSError."""
        with self._turn():
            pass

    def _open_locked(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = read_index(self.index_path)
        try:
            if not self.path.exists():
                # A first start, or a rotation cut after its rename: a new, empty segment.
                # The ids carry over (a pending intent's bytes went to the rotated file: a
                # rotation starts only after the last batch was written whole).
                if state is not None:
                    state.commit_pending()
                self._begin_segment(state.ids if state is not None else {}, time.time())
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self._fd = fd
            self._start, self._end = self._recover(fd, state)
            self._keep_ids(state.ids if state is not None else {})
            self._rewrite_index()
        except BaseException:
            self.close_files()
            raise

    def _begin_segment(self, ids: Mapping[str, bool], start: float) -> None:
        """Start an empty live file: its header (ids carried over) first, then the file.

        In that order, a crash between the two leaves no live file and an index whose ids
        are all valid, which `open` takes up; never a new live file beside an index that
        still describes the old one.
        """
        self._start, self._end = start, 0
        self._keep_ids(ids)
        self._rewrite_index()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self._sync_directory()  # the new name is durable before a batch is committed in it

    def _keep_ids(self, ids: Mapping[str, bool]) -> None:
        self._ids = dict(list(ids.items())[-self.index_size :])

    def _recover(self, fd: int, state: IndexState | None) -> tuple[float, int]:
        """(segment start, committed end) of an existing live file; cuts an unfinished tail."""
        size = os.fstat(fd).st_size
        if state is None:
            # A file written before indexes existed (or whose index was deleted): all of it
            # counts as committed, with no ids known.
            return time.time(), size
        start = state.start if state.start is not None else time.time()
        cut = False
        if state.pending is not None:
            if intent_holds(fd, state.pending, size):
                state.commit_pending()
            else:
                state.pending = None  # cut by a crash: its messages were not acked
                cut = True
        end = state.end
        if size > end and state.version >= INTENT_VERSION and not cut:
            # Complete lines past the last intent: the index lost its newest lines (a power
            # loss after the live file's fsync). Keep them; drop a torn last line.
            end = self._last_line_end(fd, end, size)
            if end > state.end:
                logger.warning(
                    "%s: %d bytes of complete lines past its index (kept; a power loss may "
                    "have lost the index's newest lines, so their messages may come twice)",
                    self.path,
                    end - state.end,
                )
        if size > end:
            os.ftruncate(fd, end)  # an unfinished batch: its messages were not acked
            self._sync(fd)
        return start, min(end, size)

    @staticmethod
    def _last_line_end(fd: int, end: int, size: int) -> int:
        """The offset just past the last newline in [end, size), or `end` if there is none."""
        tail = os.pread(fd, size - end, end)
        newline = tail.rfind(b"\n")
        return end if newline < 0 else end + newline + 1

    def _rewrite_index(self) -> None:
        """Replace the index with a compact one: header, committed end, newest ids."""
        temporary = self.index_path.with_name(f".{self.index_path.name}.tmp")
        with open(temporary, "wb") as file:
            file.write(header_line(self._start, self._end) + carry_lines(self._ids))
            file.flush()
            self._sync(file.fileno())
        os.replace(temporary, self.index_path)
        self._sync_directory()
        if self._index_fd is not None:
            os.close(self._index_fd)
        self._index_fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._index_entries = len(self._ids)

    # -- writing ------------------------------------------------------------------------

    def write(self, entries: Sequence[Line]) -> int:
        """Append the lines whose ids are not written yet; returns how many were written.

        A line is skipped when its id is remembered, or its sequence key is one of those
        carried over from an index of an earlier version.

        On OSError nothing of the batch remains: the live file and the index are cut back to
        where the batch began (or, if even that fails, at the next open).
        """
        with self._turn():
            return self._write_locked(entries)

    def _write_locked(self, entries: Sequence[Line]) -> int:
        ids = self._ids
        fresh: dict[str, None] = {}
        data = bytearray()
        for key, sequence, line in entries:
            if key in ids or key in fresh or ids.get(sequence) is True:
                continue
            fresh[key] = None
            data += line
        if not fresh:
            return 0
        if self._should_rotate(len(data)):
            self._rotate_locked()
        fd, index_fd = self._fd, self._index_fd
        assert fd is not None
        assert index_fd is not None
        start = self._end
        index_start = os.fstat(index_fd).st_size
        payload = bytes(data)
        try:
            _write_all(index_fd, intent_line(start, payload, fresh), None)
            _write_all(fd, payload, start)
            self._sync(fd)
        except OSError:
            try:
                os.ftruncate(fd, start)
                os.ftruncate(index_fd, index_start)
            except OSError:
                pass  # the next open cuts what the intent says is unfinished
            self.close_files()
            raise
        self._end = start + len(payload)
        ids = self._ids  # a rotation above started a new dict
        for key in fresh:
            ids[key] = False
        while len(ids) > self.index_size:
            del ids[next(iter(ids))]
        self._index_entries += len(fresh)
        if self._index_entries > 2 * self.index_size:
            self._rewrite_index()
        return len(fresh)

    # -- rotation -------------------------------------------------------------------------

    def _should_rotate(self, incoming: int) -> bool:
        if self._end == 0:
            if self.rotate_every is not None:
                self._start = time.time()  # an empty segment just moves its start
            return False
        if self.rotate_bytes is not None and self._end + incoming > self.rotate_bytes:
            return True
        if self.rotate_every is not None:
            every = self.rotate_every
            return int(time.time() // every) != int(self._start // every)
        return False

    def rotate(self) -> Segment:
        """Close the live file under its rotated name and start an empty one.

        The rename first, made durable; then the new segment, as `open` starts one when it
        finds no live file after a crash at this point.
        """
        with self._turn():
            return self._rotate_locked()

    def _rotate_locked(self) -> Segment:
        now = time.time()
        target = self._rotated_target(now)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.close_files()
        os.rename(self.path, target)
        if self.fsync and target.parent != self.path.parent:
            sync_directory(target.parent)
        self._sync_directory()  # the rename is durable before the index forgets the old end
        self._begin_segment(self._ids, now)
        return Segment(target)

    def _rotated_target(self, end: float) -> Path:
        def utc(seconds: float) -> datetime.datetime:
            return datetime.datetime.fromtimestamp(seconds, tz=datetime.UTC)

        name = self.rotated_path.format(
            stem=self.path.stem,
            suffix=self.path.suffix,
            name=self.path.name,
            start=utc(self._start),
            end=utc(end),
            daemon=self.daemon,
        )
        base = self.path.parent / name
        candidate, n = base, 0
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.stem}.{n}{base.suffix}")
        return candidate

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the live file, its index and the lock file."""
        self.close_files()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def close_files(self) -> None:
        """Close the live file and its index (the next turn opens them again)."""
        for attribute in ("_fd", "_index_fd"):
            fd = getattr(self, attribute)
            setattr(self, attribute, None)
            if fd is not None:
                os.close(fd)

    def _sync(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)

    def _sync_directory(self) -> None:
        if self.fsync:
            sync_directory(self.path.parent)


def sync_directory(directory: Path) -> None:
    """fsync a directory, making renames and new names in it durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes, offset: int | None) -> None:
    """Write all of `data` at `offset` (or the end, for O_APPEND descriptors)."""
    view = memoryview(data)
    while view:
        if offset is None:
            written = os.write(fd, view)
        else:
            written = os.pwrite(fd, view, offset)
            offset += written
        view = view[written:]
