"""The per-message writer: one file per message, atomically, so readers never see half a file.

Each body is written to a temporary dot-file in the target's directory, fsynced, renamed onto
its final name, and the directories whose entries changed are fsynced once per batch. A
redelivered message renders the same name (use `{id}` in the template) and its rename replaces
the earlier copy with identical content: a redelivery never makes a second file.

Every method blocks: run it in a worker thread.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from busway.adapters.file._append import sync_directory

__all__ = ["PerMessageWriter", "WriteFailed"]


class WriteFailed(Exception):
    """Writing `path` failed with `error`; files of the batch before it were written."""

    def __init__(self, index: int, path: Path, action: str, error: OSError) -> None:
        super().__init__(f"{action} {path}: {error}")
        self.index = index
        self.path = path
        self.action = action
        self.error = error


class PerMessageWriter:
    """Writes (index, path, data) items; see the module docstring."""

    def __init__(self, *, fsync: bool) -> None:
        self.fsync = fsync

    def write(self, items: Sequence[tuple[int, Path, bytes]]) -> None:
        """Write every item in order; raises WriteFailed at the first that fails.

        The directories of the items written before the failure are fsynced all the same,
        so what the caller reports as delivered is durable.
        """
        touched: set[Path] = set()
        try:
            for index, path, data in items:
                try:
                    touched.update(_make_parents(path.parent))
                except OSError as exc:
                    raise WriteFailed(index, path.parent, "create directory", exc) from exc
                self._write_one(index, path, data)
                touched.add(path.parent)
        finally:
            if self.fsync:
                for directory in touched:
                    with contextlib.suppress(OSError):
                        sync_directory(directory)

    def _write_one(self, index: int, path: Path, data: bytes) -> None:
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise WriteFailed(index, path, "create", exc) from exc
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(temporary, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)  # no partial file is left behind
            raise WriteFailed(index, path, "write", exc) from exc


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and missing parents; returns the parents whose entries changed."""
    missing: list[Path] = []
    current = directory
    while not current.is_dir():
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    changed: list[Path] = []
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir()
        changed.append(folder.parent)
    return changed
