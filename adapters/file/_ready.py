"""Deciding when an inbox file is complete, so that a file still being written is not taken.

Three conventions, as producers differ:

* `stable`: the size and modification time have not changed for `stable_for`. A file seen
  for the first time whose mtime is already older than that counts as stable at once (it sat
  there while busway was down).
* `marker`: the producer writes `<name><marker_suffix>` (default `.done`) after the file;
  the marker's own watch event makes its file ready at once.
* `rename`: the producer writes under another name (`.tmp`, a dot-file) and renames the file
  into place, so any file matching the patterns is complete.

Dot-files never match, nor do marker files themselves. Only regular files are taken: a
matching symbolic link (a loop included), FIFO, socket or device is left where it is and
reported once in `refused` (directories, such as `processing/`, are passed over silently).
Methods stat the disk: run them in a worker thread.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

__all__ = ["ReadyTracker"]

ReadyMode = Literal["stable", "marker", "rename"]


class ReadyTracker:
    """Remembers candidate files and tells which are ready to be claimed."""

    def __init__(
        self,
        inbox: Path,
        *,
        patterns: list[str],
        mode: ReadyMode,
        stable_for: float,
        marker_suffix: str,
    ) -> None:
        self.inbox = inbox
        self.mode = mode
        self.stable_for = stable_for
        self.marker_suffix = marker_suffix
        self._match = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))
        # name -> (size, mtime_ns, monotonic time that state was first seen)
        self._pending: dict[str, tuple[int, int, float]] = {}
        self._refused: set[str] = set()
        self.refused: list[tuple[str, str]] = []
        """(name, what it is) of matching entries that are not regular files, each reported
        once while it stays: the caller takes the list and logs it."""

    def matches(self, name: str) -> bool:
        """True for names this source takes (patterns match, not hidden, not a marker)."""
        if name.startswith(".") or self._match.fullmatch(name) is None:
            return False
        return not (self.mode == "marker" and name.endswith(self.marker_suffix))

    def scan(self) -> list[str]:
        """List the whole inbox; the names ready now, oldest first."""
        with os.scandir(self.inbox) as entries:
            names = [entry.name for entry in entries]
        present = set(names)
        for gone in self._pending.keys() - present:
            del self._pending[gone]
        self._refused &= present
        return self.check(names)

    def check(self, names: Iterable[str]) -> list[str]:
        """Of `names` and the candidates already pending, those ready now, oldest first."""
        ready: list[tuple[int, str]] = []
        now, wall_ns = time.monotonic(), time.time_ns()
        for name in {*self._with_marked(names), *self._pending}:
            if not self.matches(name):
                continue
            try:
                info = os.stat(self.inbox / name, follow_symlinks=False)
            except FileNotFoundError:
                self._pending.pop(name, None)
                continue
            if not stat.S_ISREG(info.st_mode):
                if not stat.S_ISDIR(info.st_mode) and name not in self._refused:
                    self._refused.add(name)
                    self.refused.append((name, _kind(info.st_mode)))
                continue
            if self._is_ready(name, info.st_size, info.st_mtime_ns, now, wall_ns):
                self._pending.pop(name, None)
                ready.append((info.st_mtime_ns, name))
        return [name for _, name in sorted(ready)]

    def _with_marked(self, names: Iterable[str]) -> set[str]:
        """`names`, and for each marker among them the file it marks.

        A marker's own event is what says its file is complete: without this, the file would
        wait for the next full rescan.
        """
        found = set(names)
        if self.mode == "marker":
            suffix = self.marker_suffix
            found.update([name[: -len(suffix)] for name in found if name.endswith(suffix)])
        return found

    def next_check(self) -> float | None:
        """Seconds until a pending candidate may become stable, or None if none is pending."""
        if self.mode != "stable" or not self._pending:
            return None
        earliest = min(since for _, _, since in self._pending.values())
        return max(0.0, earliest + self.stable_for - time.monotonic())

    def forget(self, name: str) -> None:
        """Stop tracking `name` (claimed, or left for the next scan)."""
        self._pending.pop(name, None)

    def _is_ready(self, name: str, size: int, mtime_ns: int, now: float, wall_ns: int) -> bool:
        if self.mode == "rename":
            return True
        if self.mode == "marker":
            return os.path.lexists(self.inbox / (name + self.marker_suffix))
        seen = self._pending.get(name)
        if seen is not None and seen[:2] == (size, mtime_ns):
            return now - seen[2] >= self.stable_for
        if seen is None and (wall_ns - mtime_ns) / 1e9 >= self.stable_for:
            return True
        self._pending[name] = (size, mtime_ns, now)
        return False


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a device"
