"""Reading a claimed file as records: JSON lines, CSV rows, or the whole file as one message.

Readers are synchronous and run in a worker thread, one `read_batch` call per hop, so the
event loop pays one thread switch per few hundred records rather than per line. They read
with bounded buffers: a JSON-lines file is read line by line (a line longer than `max_line`
is skipped to its end without being held), a CSV file through `csv.reader` (whose field size
limit bounds a record), so memory does not grow with the file.

A record that cannot become a message carries `error`; the caller dead-letters it or fails
the whole file. A problem that makes the rest of the file unreadable (a decoding error, a
missing CSV header, a whole file too large) raises `FileFormatError`.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import orjson

__all__ = [
    "CsvReader",
    "FileFormatError",
    "JsonLinesReader",
    "Record",
    "RecordReader",
    "WholeFileReader",
]

_BOM = codecs.BOM_UTF8
_SKIP_CHUNK = 64 * 1024
_BAD_SAMPLE = 64 * 1024  # how much of an over-long line goes to the dead letter


class FileFormatError(Exception):
    """The file cannot be read any further; `line` is where it went wrong (0: not a line)."""

    def __init__(self, message: str, *, line: int = 0) -> None:
        super().__init__(message)
        self.line = line


@dataclass(slots=True)
class Record:
    """One message's worth of a file.

    `number` identifies it within the file (JSON-lines line, CSV data row, 1 for a whole
    file) and is part of its `Nats-Msg-Id`; `line` is the physical line it starts on;
    `offset` the byte offset just after it where that is known (JSON lines), so a resume can
    seek there. `error` is set when the record is bad; `data` then holds its raw text.
    """

    number: int
    line: int
    offset: int | None
    data: bytes
    error: str | None = None


class RecordReader(Protocol):
    """Reads the next records of a file; an empty batch means the end of the file."""

    def read_batch(self, limit: int) -> list[Record]:
        """Up to `limit` records (bad ones included), or [] at the end of the file."""
        ...


class JsonLinesReader:
    """One record per non-blank line; each must be one JSON value, published as it is."""

    def __init__(
        self, file: BinaryIO, *, max_line: int, start_line: int = 0, start_offset: int = 0
    ) -> None:
        file.seek(start_offset)
        self._readline = file.readline
        self._max_line = max_line
        self._line = start_line
        self._offset = start_offset

    def read_batch(self, limit: int) -> list[Record]:
        """The next `limit` records; blank lines are skipped (and counted as lines)."""
        records: list[Record] = []
        readline = self._readline
        max_line = self._max_line
        loads = orjson.loads
        while len(records) < limit:
            raw = readline(max_line + 1)
            if not raw:
                break
            self._line += 1
            self._offset += len(raw)
            if len(raw) > max_line and not raw.endswith(b"\n"):
                self._offset += self._skip_rest()
                records.append(
                    Record(
                        self._line,
                        self._line,
                        self._offset,
                        raw[:_BAD_SAMPLE],
                        f"line longer than max_line ({max_line} bytes)",
                    )
                )
                continue
            body = raw.strip()
            if self._line == 1 and body.startswith(_BOM):
                body = body[len(_BOM) :].strip()
            if not body:
                continue
            try:
                loads(body)
            except orjson.JSONDecodeError as exc:
                records.append(
                    Record(self._line, self._line, self._offset, body, f"not JSON: {exc}")
                )
                continue
            records.append(Record(self._line, self._line, self._offset, body))
        return records

    def _skip_rest(self) -> int:
        """Consume the rest of an over-long line without keeping it; returns its size."""
        skipped = 0
        while True:
            chunk = self._readline(_SKIP_CHUNK)
            skipped += len(chunk)
            if not chunk or chunk.endswith(b"\n"):
                return skipped


class _LineTap:
    """Feeds text lines to `csv.reader` and remembers those of the current record.

    The csv module reports neither where a record started nor its raw text; both are needed
    to dead-letter a bad row with its line number and content.
    """

    def __init__(self, text: io.TextIOWrapper) -> None:
        self._text = text
        self.lines = 0
        self.taken: list[str] = []

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        line = self._text.readline()
        if not line:
            raise StopIteration
        self.lines += 1
        self.taken.append(line)
        return line


class CsvReader:
    """One record per CSV data row, as a JSON object keyed by the header row's names."""

    def __init__(
        self,
        file: BinaryIO,
        *,
        encoding: str,
        delimiter: str,
        quotechar: str,
        start_row: int = 0,
    ) -> None:
        self._text = io.TextIOWrapper(file, encoding=encoding, errors="strict", newline="")
        self._tap = _LineTap(self._text)
        self._rows = csv.reader(self._tap, delimiter=delimiter, quotechar=quotechar, strict=True)
        self._header: list[str] | None = None
        self._row = 0
        self._skip = start_row

    def read_batch(self, limit: int) -> list[Record]:
        """The next `limit` rows; rows before the resume point are parsed but not returned."""
        records: list[Record] = []
        while len(records) < limit:
            tap = self._tap
            first_line = tap.lines + 1
            tap.taken.clear()
            try:
                fields = next(self._rows)
            except StopIteration:
                break
            except csv.Error as exc:
                record = self._bad(first_line, f"CSV syntax: {exc}")
                if record is not None:
                    records.append(record)
                continue
            except UnicodeDecodeError as exc:
                raise FileFormatError(
                    f"cannot decode line {tap.lines + 1} as {self._text.encoding}: {exc.reason}; "
                    "set `encoding` to the file's encoding",
                    line=tap.lines + 1,
                ) from None
            if not fields:
                continue  # a blank line
            if self._header is None:
                self._header = self._check_header(fields, first_line)
                continue
            if len(fields) != len(self._header):
                record = self._bad(
                    first_line, f"row has {len(fields)} fields, the header has {len(self._header)}"
                )
                if record is not None:
                    records.append(record)
                continue
            self._row += 1
            if self._row <= self._skip:
                continue
            data = orjson.dumps(dict(zip(self._header, fields, strict=True)))
            records.append(Record(self._row, first_line, None, data))
        return records

    def _bad(self, line: int, error: str) -> Record | None:
        if self._header is None:
            raise FileFormatError(f"bad header row at line {line}: {error}", line=line)
        self._row += 1
        if self._row <= self._skip:
            return None
        raw = "".join(self._tap.taken).encode("utf-8", "replace")[:_BAD_SAMPLE]
        return Record(self._row, line, None, raw, error)

    @staticmethod
    def _check_header(fields: list[str], line: int) -> list[str]:
        header = [name.strip() for name in fields]
        duplicates = sorted({name for name in header if header.count(name) > 1})
        if duplicates:
            raise FileFormatError(
                f"the header row (line {line}) repeats column(s) {', '.join(duplicates)}",
                line=line,
            )
        return header


class WholeFileReader:
    """The whole file as one record; refuses files over `max_size` (a message must fit)."""

    def __init__(self, file: BinaryIO, *, max_size: int) -> None:
        self._file = file
        self._max_size = max_size
        self._done = False

    def read_batch(self, limit: int) -> list[Record]:
        """[the file] the first time, [] after."""
        if self._done:
            return []
        self._done = True
        data = self._file.read(self._max_size + 1)
        if len(data) > self._max_size:
            raise FileFormatError(
                f"the file is larger than max_size ({self._max_size} bytes); "
                "raise max_size (and the NATS server's max_payload) or split the file"
            )
        return [Record(1, 1, None, data)]
