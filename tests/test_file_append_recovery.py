"""The append writer after a crash at every step of writing and rotating: each line once.

A SIGKILL keeps what the process handed the kernel and nothing after it. These tests stop the
writer at each change it makes to the disk in turn (a write, a rename, a new file...), or
half-way through a write, start a new writer on the same files, redeliver what the engine
had not acked, and check the live file and the rotated ones hold every message exactly once.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from busway.adapters.file import _append
from busway.adapters.file._append import AppendWriter, Line

BATCHES = [[f"S:{n}" for n in range(start, start + 3)] for start in range(1, 40, 3)]
MESSAGES = [key for batch in BATCHES for key in batch]


class Crash(BaseException):
    """The process dies here: nothing after this point reaches the disk."""


class CrashingOs:
    """`os` as `_append` sees it, dying at its `crash_at`-th change to the disk.

    With `torn`, a write dies half-way through, as a kill during a large write can.
    """

    def __init__(self, crash_at: int, *, torn: bool) -> None:
        self.crash_at = crash_at
        self.torn = torn
        self.changes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _change(self) -> bool:
        """Count a change; True if the process dies at this one."""
        self.changes += 1
        return self.changes == self.crash_at

    def write(self, fd: int, data: Any) -> int:
        if self._change():
            if self.torn:
                os.write(fd, bytes(data)[: len(data) // 2])
            raise Crash
        return os.write(fd, data)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if self._change():
            if self.torn:
                os.pwrite(fd, bytes(data)[: len(data) // 2], offset)
            raise Crash
        return os.pwrite(fd, data, offset)

    def rename(self, source: Any, target: Any) -> None:
        if self._change():
            raise Crash
        os.rename(source, target)

    def replace(self, source: Any, target: Any) -> None:
        if self._change():
            raise Crash
        os.replace(source, target)

    def ftruncate(self, fd: int, length: int) -> None:
        if self._change():
            raise Crash
        os.ftruncate(fd, length)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        if flags & os.O_CREAT and not os.path.exists(path) and self._change():
            raise Crash
        return os.open(path, flags, mode)


def writer(directory: Path) -> AppendWriter:
    return AppendWriter(
        directory / "out.jsonl",
        fsync=False,  # a kill keeps the page cache: fsync changes nothing these tests see
        rotate_bytes=60,
        rotate_every=None,
        rotated_path="archive/{stem}-{start:%Y%m%dT%H%M%S}{suffix}",
        index_size=16,
    )


def entries(batch: list[str]) -> list[Line]:
    return [Line(key, key, orjson.dumps({"id": key}) + b"\n") for key in batch]


def lines_in(directory: Path) -> Counter[str]:
    """How often each id is in the live file and the rotated ones."""
    found: Counter[str] = Counter()
    for path in directory.rglob("*.jsonl"):
        found.update(orjson.loads(line)["id"] for line in path.read_bytes().splitlines())
    return found


def run_until_crash(directory: Path, crashing: CrashingOs, monkeypatch: pytest.MonkeyPatch) -> int:
    """Write the batches until the crash; the index of the batch it interrupted."""
    first = writer(directory)
    monkeypatch.setattr(_append, "os", crashing)
    index = 0
    try:
        for batch in BATCHES:
            first.write(entries(batch))
            index += 1
    except Crash:
        return index
    finally:
        monkeypatch.setattr(_append, "os", os)
        first.close()
    return len(BATCHES)


@pytest.mark.parametrize("torn", [False, True], ids=["between-steps", "torn-write"])
def test_a_crash_at_any_step_of_writing_or_rotating_duplicates_and_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bool
) -> None:
    crash_at = 1
    while True:
        directory = tmp_path / f"crash-{crash_at}"
        crashing = CrashingOs(crash_at, torn=torn)
        interrupted = run_until_crash(directory, crashing, monkeypatch)
        if interrupted == len(BATCHES):
            break  # past the last change: every step has been crashed at
        # The restart: the interrupted batch comes again, and the one before it (its ack
        # was lost with the process), then the rest of the flow.
        second = writer(directory)
        for batch in BATCHES[max(0, interrupted - 1) :]:
            second.write(entries(batch))
        second.close()
        found = lines_in(directory)
        assert found == Counter(MESSAGES), (crash_at, interrupted, sorted(found.items()))
        crash_at += 1
    assert crash_at > 3 * len(BATCHES)  # the steps of many writes and rotations were crashed at
    assert len(list((tmp_path / "crash-1" / "archive").iterdir())) >= 4


def test_complete_lines_past_the_index_are_kept_and_a_torn_one_dropped(tmp_path: Path) -> None:
    # A power loss after the live file's fsync can lose the index's newest lines: the lines
    # may have been acked, so they stay (a redelivery may then write them twice, never lose).
    first = writer(tmp_path)
    first.write(entries(["S:1"]))
    first.close()
    out = tmp_path / "out.jsonl"
    with open(out, "ab") as file:
        file.write(b'{"id": "S:2"}\n{"id": "S:3"')
    second = writer(tmp_path)
    second.open()
    assert out.read_bytes() == b'{"id":"S:1"}\n{"id": "S:2"}\n'
    second.write(entries(["S:1", "S:4"]))
    second.close()
    assert lines_in(tmp_path) == Counter(["S:1", "S:2", "S:4"])


def test_an_index_of_the_previous_format_is_read_and_its_unfinished_tail_cut(
    tmp_path: Path,
) -> None:
    # The previous format wrote a batch's index line after its bytes: bytes past the last
    # line were never acked.
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "S:1"}\n{"id": "S:2"}\n')
    index = b'{"start": %d, "end": 14}\n{"end": 14, "ids": ["S:1"]}\n' % time.time()
    (tmp_path / "out.jsonl.ids").write_bytes(index)
    second = writer(tmp_path)
    second.write(entries(["S:1", "S:2"]))
    second.close()
    assert out.read_bytes() == b'{"id": "S:1"}\n{"id":"S:2"}\n'
