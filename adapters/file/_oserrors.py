"""File-system errors translated once into busway's: what failed, where, and what to do."""

from __future__ import annotations

import errno
from pathlib import Path

from busway import DeliveryError, PermanentError, RetryableError

__all__ = ["delivery_error", "explain"]

_HINTS = {
    errno.ENOSPC: "the disk is full: free space; messages wait and are retried",
    errno.EDQUOT: "the disk quota is exhausted: raise it or free space; messages are retried",
    errno.EACCES: "permission denied: give the busway user write access; messages are retried",
    errno.EPERM: "operation not permitted: check ownership and attributes; messages are retried",
    errno.EROFS: "the file system is read-only: remount it read-write; messages are retried",
    errno.ENOTDIR: "a path component is a file, not a directory: move it away; retried",
    errno.EISDIR: "the path is a directory: set `path` to a file name or move the directory "
    "away; messages are retried",
    errno.ELOOP: "a symbolic link loop in the path: fix the link; messages are retried",
    errno.ENOENT: "a directory on the path is missing (a dangling symbolic link?): create it; "
    "messages are retried",
    errno.EIO: "an I/O error: check the disk and its logs; messages are retried",
}
# Retrying cannot fix a name the file system refuses: the message is dead-lettered.
_PERMANENT = {errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ}


def explain(action: str, path: Path, exc: OSError) -> str:
    """`cannot <action> <path>: <errno text> (<what to do>)`."""
    hint = _HINTS.get(exc.errno or 0, "messages wait and are retried")
    return f"cannot {action} {path}: {exc.strerror or exc} ({hint})"


def delivery_error(action: str, path: Path, exc: OSError) -> DeliveryError:
    """RetryableError for a condition that can pass, PermanentError for a refused name."""
    if exc.errno in _PERMANENT:
        return PermanentError(f"cannot {action} {path}: {exc.strerror or exc}")
    return RetryableError(explain(action, path, exc))
