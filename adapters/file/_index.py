"""The append sink's id index: how much of the live file is committed, and which ids it holds.

The ids are `Message.id`s: a message's `Nats-Msg-Id` (or `<stream>:<sequence>` if it had none),
which stays the same when the message is redelivered, replayed from the dead letters, or
published again by a source resuming from an old checkpoint after the stream's duplicate window.

The index `<live file>.ids` is JSON lines of these kinds:

* `{"v": 3, "start": <epoch s>, "end": <bytes>}`: a header. The live file began at `start`
  and its first `end` bytes are committed. A rotation writes one with `end` 0, a compaction
  one with the committed size.
* `{"ids": [...]}`: ids committed earlier, carried over a compaction or a rotation. The ids
  outlive the file they were written to, so a message written just before a rotation and
  redelivered after a crash is still recognised.
* `{"sequence_ids": [...]}`: `<stream>:<sequence>` keys carried over from an index of an
  earlier version (below), older than every `ids` entry.
* `{"at": a, "end": e, "crc": c, "ids": [...]}`: a batch's intent, written *before* the batch's
  bytes `[a, e)` (whose CRC-32 is `c`). Only the last intent can be unfinished: the next one is
  written after this batch's bytes. At open, a last intent whose bytes are all there is
  committed; one whose bytes are short or differ was cut by a crash, and is dropped with them.
* `{"end": e, "ids": [...]}`: a batch line of version 1 (earlier versions wrote it after the
  batch's bytes and their fsync), committed as it stands.

Versions 1 and 2 (a header without `"v"`, or `"v": 2`) keyed lines by `<stream>:<sequence>`,
which a redelivery keeps but a replay or a late republish does not. Their ids are read as
*sequence keys* and written back as `sequence_ids`: a message redelivered right after an
upgrade is recognised by its stream and sequence, until newer ids push the old keys out.

Reading stops at the first line that does not parse: a crash can tear only the last one.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "INTENT_VERSION",
    "VERSION",
    "IndexState",
    "Intent",
    "carry_lines",
    "header_line",
    "intent_holds",
    "intent_line",
    "read_index",
]

VERSION = 3
"""Ids are `Message.id`s."""
INTENT_VERSION = 2
"""The first version that writes a batch's intent before its bytes."""


@dataclass(frozen=True, slots=True)
class Intent:
    """A batch about to be written: its byte range in the live file, their CRC-32, its ids."""

    at: int
    end: int
    crc: int
    ids: list[str]


@dataclass(slots=True)
class IndexState:
    """What an index file says: the segment, its committed end, the ids, a last intent.

    `ids` maps each remembered id, oldest first, to True if it is a `<stream>:<sequence>` key
    from an index of version 1 or 2, False if it is a `Message.id`.
    """

    version: int
    start: float | None
    end: int
    ids: dict[str, bool] = field(default_factory=dict)
    pending: Intent | None = None
    """The last intent, not yet known to be complete (see `intent_holds`)."""

    @property
    def sequence_keyed(self) -> bool:
        """True while reading lines of a version that keyed them by stream and sequence."""
        return self.version < VERSION

    def remember(self, keys: Iterable[str], *, sequence_keys: bool) -> None:
        """Add committed ids (as the newest)."""
        for key in keys:
            self.ids.pop(key, None)
            self.ids[key] = sequence_keys

    def commit_pending(self) -> None:
        """The last intent is known complete: its bytes and ids are committed."""
        if self.pending is not None:
            self.end = self.pending.end
            self.remember(self.pending.ids, sequence_keys=self.sequence_keyed)
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
    elif "sequence_ids" in entry:
        state.remember((str(key) for key in entry["sequence_ids"]), sequence_keys=True)
    else:
        if "end" in entry:
            state.end = int(entry["end"])
        keys = [str(key) for key in entry["ids"]]
        state.remember(keys, sequence_keys=state.sequence_keyed)


def intent_holds(fd: int, intent: Intent, size: int) -> bool:
    """True if the live file (`fd`, `size` bytes) holds all of `intent`'s bytes unchanged."""
    if intent.end > size or intent.at > intent.end:
        return False
    data = os.pread(fd, intent.end - intent.at, intent.at)
    return len(data) == intent.end - intent.at and zlib.crc32(data) == intent.crc


def header_line(start: float, end: int) -> bytes:
    """A segment header: the live file began at `start`; its first `end` bytes are committed."""
    return orjson.dumps({"v": VERSION, "start": start, "end": end}) + b"\n"


def carry_lines(ids: Mapping[str, bool]) -> bytes:
    """Ids committed earlier, carried into a new (compacted or rotated) index.

    The sequence keys of an earlier version first: they are older than any message id.
    """
    sequence_keys = [key for key, legacy in ids.items() if legacy]
    message_ids = [key for key, legacy in ids.items() if not legacy]
    lines = orjson.dumps({"sequence_ids": sequence_keys}) + b"\n" if sequence_keys else b""
    return lines + orjson.dumps({"ids": message_ids}) + b"\n"


def intent_line(at: int, data: bytes, ids: Iterable[str]) -> bytes:
    """The intent of a batch whose `data` is about to be written at offset `at`."""
    entry = {"at": at, "end": at + len(data), "crc": zlib.crc32(data), "ids": list(ids)}
    return orjson.dumps(entry) + b"\n"
