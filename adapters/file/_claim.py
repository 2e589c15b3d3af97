"""Claiming inbox files so that each is processed by exactly one daemon, and finishing them.

A file is claimed by `os.rename` into `processing/` (atomic: of two daemons renaming the same
file, one gets ENOENT) and then held with an exclusive `flock` on an open descriptor for as
long as it is processed. The lock is what marks a claim as *live*: the kernel drops it when
the holder exits, SIGKILL included, so a file in `processing/` whose lock can be taken belongs
to a daemon that died. Any daemon adopts such orphans at start-up and at every rescan, and
re-publishes them from their last checkpoint; the `Nats-Msg-Id`s are the same as the first
time, so what had been stored already is dropped by the stream as a duplicate.

Why a lock rather than a claim file with an owner and a heartbeat: it needs no clock, no
stale-claim timeout and no takeover protocol, and two daemons can never process one file at
once (which with "just resume" would publish duplicates once the first copy is older than the
stream's duplicate window). Locks are local to one kernel: daemons on different hosts sharing
a network file system need one whose locks are coherent across clients (NFSv4 is).

Names in `done/` and `failed/` are never overwritten: a second file of the same name gets a
`.1`, `.2`... suffix, because the move is made with `os.link`, which refuses an existing name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

from busway.adapters.file._names import printable as _printable

__all__ = ["Claim", "FileVanished", "Inbox", "Refused", "claim_identity"]

_READ_BUFFER = 1024 * 1024
_LOCKS_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_LINK_UNSUPPORTED = (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK)


def claim_identity(name: str, ino: int, size: int, mtime_ns: int) -> str:
    """A file's identity, the same before and after its claim and across restarts.

    The rename into `processing/` keeps the inode, size and modification time, and the file
    keeps its name, so a resumed file republishes exactly the message ids of the first run.
    A file dropped again later (a new inode, usually a new mtime) is a new delivery.
    """
    key = f"{name}\0{ino}\0{size}\0{mtime_ns}".encode("utf-8", "surrogateescape")
    return hashlib.sha256(key).hexdigest()[:24]


class FileVanished(Exception):
    """A claimed file was removed from `processing/` by someone else before it could be moved.

    The claim's open descriptor kept the file readable, so it was read whole; there is just
    nothing left to move.
    """


@dataclass(frozen=True, slots=True)
class Refused:
    """A claimed (or orphaned) file that cannot be opened: moved to `target` (None: it could
    not be moved either, and stays in `processing/`)."""

    name: str
    error: OSError
    target: Path | None


@dataclass(slots=True)
class Claim:
    """A file this daemon holds in `processing/`, locked through `fd` until released."""

    name: str
    path: Path
    fd: int
    size: int
    mtime_ns: int
    identity: str
    resumed: bool

    @property
    def message_key(self) -> str:
        """What names the file in its message ids: its identity."""
        return self.identity

    def open(self) -> BinaryIO:
        """A buffered reader of the file; closing it keeps the claim (it is a `dup`)."""
        return os.fdopen(os.dup(self.fd), "rb", buffering=_READ_BUFFER)

    def release(self) -> None:
        """Drop the lock (by closing the descriptor)."""
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


class Inbox:
    """The inbox directory and its `processing/`, `done/` and `failed/` subfolders.

    Every method does blocking file-system calls: run them in a worker thread.
    """

    def __init__(
        self,
        inbox: Path,
        *,
        processing: Path,
        done: Path | None,
        failed: Path,
        marker_suffix: str | None,
    ) -> None:
        self.inbox = inbox
        self.processing = processing
        self.done = done
        self.failed = failed
        self.marker_suffix = marker_suffix
        self.locks_supported = True
        self.refused: list[Refused] = []
        """Files that could not be opened since the caller last took the list."""

    def prepare(self) -> None:
        """Create the folders and prove they are writable; raises OSError otherwise."""
        folders = [self.inbox, self.processing, self.failed]
        if self.done is not None:
            folders.append(self.done)
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                os.stat(folder)  # a symbolic link loop or a dangling link: its real error
                raise NotADirectoryError(
                    errno.ENOTDIR, "exists and is not a directory", str(folder)
                ) from None
            probe = folder / f".busway-probe-{os.getpid()}"
            probe.touch()
            probe.unlink()
            if folder.stat().st_dev != self.inbox.stat().st_dev:
                # Claims and moves are renames, which cannot cross file systems.
                raise OSError(
                    errno.EXDEV, "not on the inbox's file system (moves are renames)", str(folder)
                )

    def claim(self, name: str) -> Claim | Literal["taken", "busy"]:
        """Move `name` into `processing/` and lock it.

        "taken": another daemon claimed it first (or it vanished). "busy": a file of the same
        name is still being processed; it stays in the inbox until that one is finished.
        """
        target = self.processing / name
        if os.path.lexists(target):
            return "busy"
        try:
            os.rename(self.inbox / name, target)
        except FileNotFoundError:
            return "taken"
        claim = self._lock(target, resumed=False)
        if claim is None:
            return "taken"  # an orphan scan elsewhere adopted it between rename and lock
        if self.marker_suffix:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.inbox / (name + self.marker_suffix))
        return claim

    def orphans(self, active: set[str]) -> list[Claim]:
        """Lock and return every file in `processing/` whose claim died with its daemon."""
        adopted: list[Claim] = []
        with os.scandir(self.processing) as entries:
            names = [
                entry.name
                for entry in entries
                if entry.is_file(follow_symlinks=False) and not entry.name.startswith(".")
            ]
        for name in sorted(names):
            if name in active:
                continue
            claim = self._lock(self.processing / name, resumed=True)
            if claim is not None:
                adopted.append(claim)
        return adopted

    def finish(self, claim: Claim) -> Path | None:
        """Move a fully published file to `done/` (or delete it); returns where it went.

        Raises FileVanished if the file is no longer in `processing/`.
        """
        try:
            if self.done is None:
                os.unlink(claim.path)
                return None
            return _move_no_replace(claim.path, self.done, claim.name)
        except FileNotFoundError:
            if os.path.lexists(claim.path):
                raise  # a folder is missing, not the file: the caller retries
            raise FileVanished(claim.path) from None
        finally:
            claim.release()

    def fail(self, claim: Claim, explanation: str) -> Path:
        """Move a file to `failed/` beside a `<name>.error` file saying why.

        Raises FileVanished (after writing the `.error` file) if the file is no longer in
        `processing/`.
        """
        try:
            name = _free_name(self.failed, claim.name, also=".error")
            error_file = self.failed / f"{name}.error"
            temporary = self.failed / f".{name}.error.tmp"
            temporary.write_text(explanation, encoding="utf-8")
            os.replace(temporary, error_file)
            try:
                return _move_no_replace(claim.path, self.failed, name)
            except FileNotFoundError:
                if os.path.lexists(claim.path):
                    raise
                raise FileVanished(claim.path) from None
        finally:
            claim.release()

    def _lock(self, path: Path, *, resumed: bool) -> Claim | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            # Permission denied, an I/O error...: it cannot be published. Out of processing/,
            # so that it neither blocks its name nor is retried at every rescan.
            self.refused.append(Refused(path.name, exc, self._refuse(path, exc)))
            return None
        try:
            if not self._try_lock(fd):
                os.close(fd)
                return None
            held = os.fstat(fd)
            try:
                current = os.stat(path, follow_symlinks=False)
            except FileNotFoundError:
                current = None
            if current is None or (current.st_ino, current.st_dev) != (held.st_ino, held.st_dev):
                # Finished (moved away) by its previous holder between our open and our lock.
                os.close(fd)
                return None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        return Claim(
            name=path.name,
            path=path,
            fd=fd,
            size=held.st_size,
            mtime_ns=held.st_mtime_ns,
            identity=claim_identity(path.name, held.st_ino, held.st_size, held.st_mtime_ns),
            resumed=resumed,
        )

    def _refuse(self, path: Path, exc: OSError) -> Path | None:
        """Move an unopenable file to `failed/` beside its `.error`; None if that fails too."""
        try:
            name = _free_name(self.failed, path.name, also=".error")
            temporary = self.failed / f".{name}.error.tmp"
            temporary.write_text(
                f"file: {_printable(path.name)}\n"
                f"error: cannot open it: {exc.strerror or exc}\n"
                "what to do: give the busway user read access to it and drop it into the "
                "inbox again\n",
                encoding="utf-8",
            )
            os.replace(temporary, self.failed / f"{name}.error")
            return _move_no_replace(path, self.failed, name)
        except OSError:
            return None

    def _try_lock(self, fd: int) -> bool:
        if not self.locks_supported:
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno not in _LOCKS_UNSUPPORTED:
                raise
            # Without locks, an orphan is simply resumed: the message ids make a second
            # publisher harmless within the stream's duplicate window.
            self.locks_supported = False
        return True


def _free_name(folder: Path, name: str, *, also: str = "") -> str:
    """`name`, or `name.1`, `name.2`... whichever is free in `folder` (with `also` suffix too)."""
    candidate, n = name, 0
    while os.path.lexists(folder / candidate) or (
        also and os.path.lexists(folder / (candidate + also))
    ):
        n += 1
        candidate = f"{name}.{n}"
    return candidate


def _move_no_replace(source: Path, folder: Path, name: str) -> Path:
    """Move `source` into `folder` as `name` (or `name.N`), never replacing an existing file."""
    n = 0
    while True:
        target = folder / (name if n == 0 else f"{name}.{n}")
        try:
            os.link(source, target)
        except FileExistsError:
            n += 1
            continue
        except OSError as exc:
            if exc.errno not in _LINK_UNSUPPORTED:
                raise
            target = folder / _free_name(folder, name)
            os.rename(source, target)
            return target
        os.unlink(source)
        return target
