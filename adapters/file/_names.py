"""Inbox file names as messages carry them: in headers, log lines and `.error` files.

A file name on Linux is any bytes but `/` and NUL. Python reads the bytes that are not UTF-8
as lone surrogates (`surrogateescape`), which cannot be encoded into a NATS header (or JSON
log line), and a name holding a line break would end the header early. Such a file cannot be
published as it is named: the source moves it to `failed/` instead (see `source`), and every
log line shows names through `printable`, never raw.
"""

from __future__ import annotations

__all__ = ["printable", "unusable"]


def unusable(name: str) -> str | None:
    """Why a file named `name` cannot be published, or None if it can."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8"
    if any(ord(char) < 0x20 or char == "\x7f" for char in name):
        return "its name holds a control character (a line break, a tab...)"
    return None


def printable(name: str | object) -> str:
    """`name` safe for a log line: bytes that are not UTF-8 as `\\xNN`, controls escaped."""
    text = str(name).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(
        char if char.isprintable() else char.encode("unicode_escape").decode("ascii")
        for char in text
    )
