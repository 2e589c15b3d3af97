"""The append sink's id index: how much of the live file is committed, and which ids it holds.

The index `<live file>.ids` is JSON lines of four kinds:

* `{"v": 2, "start": <epoch s>, "end": <bytes>}`: a header. The live file began at `start`
  and its first `end` bytes are committed. A rotation writes one with `end` 0, a compaction
  one with the committed size.
* `{"ids": [...]}`: ids committed earlier, carried over a compaction or a rotation. The ids
  outlive the file they were written to, so a message written just before a rotation and
  redelivered after a crash is still recognised.
* `{"at": a, "end": e, "crc": c, "ids": [...]}`: a batch's intent, written *before* the batch's
  bytes `[a, e)` (whose CRC-32 is `c`). Only the last intent can be unfinished: the next one is
  written after this batch's bytes. At open, a last intent whose bytes are all there is
  committed; one whose bytes are short or differ was cut by a crash, and is dropped with them.
* `{"end": e, "ids": [...]}`: a batch line of version 1 (earlier versions wrote it after the
  batch's bytes and their fsync), committed as it stands.

Reading stops at the first line that does not parse: a crash can tear only the last one.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "VERSION",
    "IndexState",
    "Intent",
    "carry_line",
    "header_line",
    "intent_holds",
    "intent_line",
    "read_index",
]

VERSION = 2


@dataclass(frozen=True, slots=True)
class Intent:
    """A batch about to be written: its byte range in the live file, their CRC-32, its ids."""

    at: int
    end: int
    crc: int
    ids: list[str]


@dataclass(slots=True)
class IndexState:
    """What an index file says: the segment, its committed end, the ids, a last intent."""

    version: int
    start: float | None
    end: int
    ids: list[str] = field(default_factory=list)
    pending: Intent | None = None
    """The last intent, not yet known to be complete (see `intent_holds`)."""

    def commit_pending(self) -> None:
        """The last intent is known complete: its bytes and ids are committed."""
        if self.pending is not None:
            self.end = self.pending.end
            self.ids.extend(self.pending.ids)
            self.pending = None


def read_index(path: Path) -> IndexState | None:
    """The state the index at `path` describes, or None if there is no index."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    state = IndexState(version=1, start=None, end=0)
    for line in raw.splitlines():
        try:
            entry = orjson.loads(line)
            _apply(state, entry)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            break  # a torn last line (or a damaged one): nothing after it is trusted
    return state


def _apply(state: IndexState, entry: dict[str, Any]) -> None:
    if "crc" in entry:
        intent = Intent(
            at=int(entry["at"]),
            end=int(entry["end"]),
            crc=int(entry["crc"]),
            ids=[str(key) for key in entry["ids"]],
        )
        state.commit_pending()  # another intent follows: the previous batch was written whole
        state.pending = intent
        return
    state.commit_pending()
    if "start" in entry:
        state.version = int(entry.get("v", 1))
        state.start = float(entry["start"])
        state.end = int(entry.get("end", state.end))
    elif "end" in entry:
        state.end = int(entry["end"])
        state.ids.extend(str(key) for key in entry["ids"])
    else:
        state.ids.extend(str(key) for key in entry["ids"])


def intent_holds(fd: int, intent: Intent, size: int) -> bool:
    """True if the live file (`fd`, `size` bytes) holds all of `intent`'s bytes unchanged."""
    if intent.end > size or intent.at > intent.end:
        return False
    data = os.pread(fd, intent.end - intent.at, intent.at)
    return len(data) == intent.end - intent.at and zlib.crc32(data) == intent.crc


def header_line(start: float, end: int) -> bytes:
    """A segment header: the live file began at `start`; its first `end` bytes are committed."""
    return orjson.dumps({"v": VERSION, "start": start, "end": end}) + b"\n"


def carry_line(ids: Iterable[str]) -> bytes:
    """Ids committed earlier, carried into a new (compacted or rotated) index."""
    return orjson.dumps({"ids": list(ids)}) + b"\n"


def intent_line(at: int, data: bytes, ids: Iterable[str]) -> bytes:
    """The intent of a batch whose `data` is about to be written at offset `at`."""
    entry = {"at": at, "end": at + len(data), "crc": zlib.crc32(data), "ids": list(ids)}
    return orjson.dumps(entry) + b"\n"
