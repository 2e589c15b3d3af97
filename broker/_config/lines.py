"""Where a key path (`$.routes[1].to`) is written in a TOML config: its line, for errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

from busway._config.document import MAX_CONFIG_BYTES, read_bounded
from busway._errors import ConfigError

__all__ = ["key_line", "line_of", "locate_in_file"]


def locate_in_file(error: ConfigError, file: str | os.PathLike[str]) -> ConfigError:
    """`error` (found after decoding, e.g. by compiling an expression) placed in `file`."""
    if error.path is None:
        return ConfigError(error.detail, file=os.fspath(file), line=error.line)
    try:
        data = read_bounded(Path(file), MAX_CONFIG_BYTES, what="the config file")
    except ConfigError:
        return error
    text = data.decode("utf-8", errors="replace")
    return error.located(file=os.fspath(file), line=line_of(text, error.path))


_HEADER = re.compile(r"^\s*\[(\[)?\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]?\]\s*(#.*)?$")
_PATH_TOKEN = re.compile(r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]")


def line_of(text: str, path: str) -> int | None:
    """Best-effort 1-based line of the key at `path` (`$.routes[1].to`) in TOML `text`.

    Handles the shapes busway configs use: top-level keys, `[table]`, `[[array]]` and keys inside
    them. Returns None where the key is not written out (a default) or the shape is unusual.
    """
    tokens: list[tuple[str, int | None]] = []
    for name, index in _PATH_TOKEN.findall(path):
        if name:
            tokens.append((name, None))
        elif tokens and tokens[-1][1] is None:
            tokens[-1] = (tokens[-1][0], int(index))
    if not tokens:
        return None
    lines = text.splitlines()
    (table, index), rest = tokens[0], tokens[1:]
    if index is None and not rest:  # `$.shutdown_timeout`, a top-level key, or `$.http`
        found = _find_key(lines, 0, table)
        if found is not None:
            return found
    seen = -1
    for number, line in enumerate(lines):
        header = _HEADER.match(line)
        if not header or header.group(2) != table or (header.group(1) is None) != (index is None):
            continue
        seen += 1
        if index is not None and seen != index:
            continue
        if rest and rest[0][0]:
            return _find_key(lines, number + 1, rest[0][0]) or number + 1
        return number + 1
    return None


def key_line(text: str, table: str, key: str) -> int | None:
    """The line of `key` written in the `[table]` or `[[table]]` at path `table`, else None."""
    header = line_of(text, table)
    if header is None:
        return None
    return _find_key(text.splitlines(), header, key)


def _find_key(lines: list[str], start: int, key: str) -> int | None:
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=")
    for number in range(start, len(lines)):
        if _HEADER.match(lines[number]):
            return None
        if pattern.match(lines[number]):
            return number + 1
    return None
