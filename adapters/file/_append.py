"""The append writer: JSON lines into one live file, rotated by size or time, never doubled.

Beside the live file `orders.jsonl` lives its index `orders.jsonl.ids`: one JSON line per
written batch, `{"end": <size of the live file after the batch>, "ids": [...]}`, after a
header line `{"start": <epoch seconds the segment began>}`. A batch is committed when its
index line is on disk, and only then does the sink return (and the engine ack):

* a crash after the data but before the index line leaves an uncommitted tail; opening the
  file again truncates it away, and the redelivered messages are written once;
* a crash after the index line but before the ack redelivers messages whose ids the index
  holds: they are skipped, not written twice.

The ids are `<stream>:<sequence>`, which a redelivery keeps. The index holds the ids of the
current segment (and, in memory, the previous one), at most `index_size` of them; when its file
grows past twice that it is rewritten with the newest.

Rotation renames the live file to `rotated_path`, a template relative to the live file's
directory with `{stem}`, `{suffix}`, `{name}` and the segment's `{start}` / `{end}` as UTC
datetimes (`{start:%Y%m%d}`), so a rotated file appears complete, at once, under its final
name. An existing name is never replaced (`.1`, `.2`... are appended).

Every method blocks: run them in a worker thread.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from collections.abc import Sequence
from pathlib import Path

import orjson

__all__ = ["AppendWriter", "Segment"]


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
    ) -> None:
        self.path = path
        self.index_path = path.with_name(path.name + ".ids")
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes
        self.rotate_every = rotate_every
        self.rotated_path = rotated_path
        self.index_size = index_size
        self._fd: int | None = None
        self._index_fd: int | None = None
        self._end = 0
        self._start = 0.0
        self._ids: dict[str, None] = {}
        self._previous: set[str] = set()
        self._index_entries = 0

    # -- opening and recovery ------------------------------------------------------------

    def open(self) -> None:
        """Open (or recover) the live file and its index; raises OSError."""
        if self._fd is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.index_path)  # left by a rotation interrupted by a crash
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            size = os.fstat(fd).st_size
            start, end, ids = self._read_index(size)
            if size > end:
                os.ftruncate(fd, end)  # an uncommitted batch: its messages were not acked
                self._sync(fd)
            self._fd, self._end, self._start = fd, min(end, size), start
            self._ids = dict.fromkeys(ids[-self.index_size :])
            self._rewrite_index()
        except BaseException:
            self._fd = None
            os.close(fd)
            raise

    def _read_index(self, size: int) -> tuple[float, int, list[str]]:
        """(segment start, committed end, ids) from the index file; a torn last line is ignored."""
        try:
            raw = self.index_path.read_bytes()
        except FileNotFoundError:
            # A file written before indexes existed (or whose index was deleted): all of it
            # counts as committed, with no ids known.
            return time.time(), size, []
        start, end, ids = time.time(), 0, []
        for line in raw.splitlines():
            try:
                entry = orjson.loads(line)
            except orjson.JSONDecodeError:
                break
            if "start" in entry:
                start = float(entry["start"])
                end = int(entry.get("end", end))
            else:
                end = int(entry["end"])
                ids.extend(entry["ids"])
        return start, end, ids

    def _rewrite_index(self) -> None:
        """Replace the index with a compact one: header, committed end, newest ids."""
        temporary = self.index_path.with_name(f".{self.index_path.name}.tmp")
        header = orjson.dumps({"start": self._start, "end": self._end})
        body = orjson.dumps({"end": self._end, "ids": list(self._ids)})
        with open(temporary, "wb") as file:
            file.write(header + b"\n" + body + b"\n")
            file.flush()
            self._sync(file.fileno())
        os.replace(temporary, self.index_path)
        self._sync_directory()
        if self._index_fd is not None:
            os.close(self._index_fd)
        self._index_fd = os.open(self.index_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._index_entries = len(self._ids)

    # -- writing ------------------------------------------------------------------------

    def write(self, entries: Sequence[tuple[str, bytes]]) -> int:
        """Append the lines whose ids are not written yet; returns how many were written.

        On OSError nothing of the batch remains: the live file and the index are truncated
        back to where the batch began.
        """
        self.open()
        assert self._fd is not None
        assert self._index_fd is not None
        fresh: dict[str, None] = {}
        data = bytearray()
        for key, line in entries:
            if key in self._ids or key in self._previous or key in fresh:
                continue
            fresh[key] = None
            data += line
        if not fresh:
            return 0
        if self._should_rotate(len(data)):
            self.rotate()
        fd, index_fd = self._fd, self._index_fd
        start = self._end
        index_start = os.fstat(index_fd).st_size
        try:
            _write_all(fd, bytes(data), start)
            self._sync(fd)
            entry = orjson.dumps({"end": start + len(data), "ids": list(fresh)}) + b"\n"
            _write_all(index_fd, entry, None)
            self._sync(index_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, start)
            with contextlib.suppress(OSError):
                os.ftruncate(index_fd, index_start)
            raise
        self._end = start + len(data)
        ids = self._ids
        for key in fresh:
            ids[key] = None
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
        """Close the live file under its rotated name and start an empty one."""
        self.open()
        end = time.time()
        target = self._rotated_target(end)
        target.parent.mkdir(parents=True, exist_ok=True)
        self.close()
        os.rename(self.path, target)
        self._sync_directory()
        if self.fsync and target.parent != self.path.parent:
            sync_directory(target.parent)
        os.unlink(self.index_path)
        self._previous = set(self._ids)
        self._ids = {}
        self._end, self._start = 0, end
        self.open()
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
        )
        base = self.path.parent / name
        candidate, n = base, 0
        while candidate.exists():
            n += 1
            candidate = base.with_name(f"{base.stem}.{n}{base.suffix}")
        return candidate

    # -- closing --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the live file and its index."""
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
