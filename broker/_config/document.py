"""A config file's text, before it becomes structs: read, parsed, checked, interpolated.

Everything here assumes the input is hostile or broken (`busway check` must answer any file in
one line): reads are bounded and refuse what is not a regular file, nesting is checked without
recursion, and `${ENV}` / `${file:...}` references are resolved with the same care. Errors are
`ConfigError`s with the key path (`$.nats.name`) and, where the text says, the line.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from busway._errors import ConfigError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_DEPTH",
    "MAX_REFERENCED_BYTES",
    "check_values",
    "interpolate",
    "parse_toml",
    "read_bounded",
    "short",
]

MAX_CONFIG_BYTES = 16 * 1024 * 1024
"""The largest config file read: a real one is kilobytes; `busway check /dev/zero` must end."""
MAX_REFERENCED_BYTES = 1024 * 1024
"""The largest file a `${file:...}` reference may read (a secret, a token, a certificate)."""
MAX_DEPTH = 32
"""How deep tables and arrays may nest; busway's own settings need fewer than 10 levels."""


def read_bounded(path: Path, limit: int, *, what: str, path_in_config: str | None = None) -> bytes:
    """The bytes of the regular file `path`, at most `limit` of them; ConfigError otherwise.

    Bounded and regular-only because the path comes from a config (`${file:/dev/zero}`, a
    directory, a FIFO nobody writes to): each must be an error, not a hang or an OOM.
    """
    try:
        # O_NONBLOCK: opening a FIFO nobody writes to would otherwise block right here.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise ConfigError(
                    f"cannot read {what}: {str(path)!r} is not a regular file",
                    path=path_in_config,
                )
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError(
            f"cannot read {what}: {exc.strerror or exc}", path=path_in_config
        ) from None
    except ValueError as exc:  # a path with a NUL character
        raise ConfigError(f"cannot read {what}: {exc}", path=path_in_config) from None
    if len(data) > limit:
        raise ConfigError(
            f"{what} is larger than {limit // 1024} KiB: is it the right file?",
            path=path_in_config,
        )
    return data


def parse_toml(text: str) -> dict[str, Any]:
    """The TOML document in `text`; ConfigError with the line of the first syntax error."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found = re.search(r"\(at line (\d+), column \d+\)", str(exc))
        raise ConfigError(
            f"invalid TOML: {exc}", line=int(found.group(1)) if found else None
        ) from None
    except RecursionError:  # tomllib parses nested arrays and inline tables recursively
        raise ConfigError(
            f"arrays or inline tables are nested more than {MAX_DEPTH} levels deep",
            line=_deep_nesting_line(text),
        ) from None


def check_values(document: dict[str, Any]) -> dict[str, Any]:
    """Refuse what no busway setting can hold: deep nesting and NUL characters.

    Also turns TOML date-times into RFC 3339 strings (`start = 2025-01-01T00:00:00Z` works
    quoted or not). Iterative, so no input can exhaust the stack.
    """
    stack: list[tuple[Any, str, int]] = [(document, "$", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ConfigError(
                f"tables or arrays are nested more than {MAX_DEPTH} levels deep", path=path
            )
        if isinstance(value, dict):
            for key, item in value.items():
                if "\0" in key:
                    raise ConfigError(f"NUL character in the key {key!r}", path=path)
                if isinstance(item, datetime.datetime):
                    value[key] = item.isoformat()
                stack.append((value[key], f"{path}.{key}", depth + 1))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                if isinstance(item, datetime.datetime):
                    value[index] = item.isoformat()
                stack.append((value[index], f"{path}[{index}]", depth + 1))
        elif isinstance(value, str) and "\0" in value:
            raise ConfigError("NUL character in a string: no setting can hold one", path=path)
    return document


def _deep_nesting_line(text: str) -> int | None:
    """The line where `[` / `{` nesting first exceeds MAX_DEPTH (strings skipped roughly)."""
    depth = 0
    quote = ""
    for number, line in enumerate(text.splitlines(), start=1):
        escaped = False
        for char in line:
            if quote:
                if escaped:
                    escaped = False
                elif char == "\\" and quote == '"':
                    escaped = True
                elif char == quote:
                    quote = ""
            elif char in "\"'":
                quote = char
            elif char == "#":
                break
            elif char in "[{":
                depth += 1
                if depth > MAX_DEPTH:
                    return number
            elif char in "]}":
                depth = max(0, depth - 1)
        quote = ""  # multi-line strings are rare where nesting goes wrong
    return None


_REFERENCE = re.compile(r"\$\$\{|\$\{([^}]*)\}")


def interpolate(
    value: Any,
    path: str,
    environ: os._Environ[str] | dict[str, str],
    skip: Callable[[str], bool] | None = None,
) -> Any:
    """`value` with its `${...}` references resolved, except under paths `skip` accepts."""
    if skip is not None and skip(path):
        return value
    if isinstance(value, str):
        return _resolve_references(value, path, environ) if "${" in value else value
    if isinstance(value, dict):
        return {
            key: interpolate(item, f"{path}.{key}", environ, skip) for key, item in value.items()
        }
    if isinstance(value, list):
        return [interpolate(item, f"{path}[{i}]", environ, skip) for i, item in enumerate(value)]
    return value


def _resolve_references(text: str, path: str, environ: os._Environ[str] | dict[str, str]) -> str:
    def replace(found: re.Match[str]) -> str:
        if found.group(0) == "$${":
            return "${"
        reference = found.group(1).strip()
        if reference.startswith("file:"):
            return _read_reference(reference[5:], path)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", reference):
            raise ConfigError(
                f"invalid reference ${{{short(reference)}}}: expected ${{ENV_VAR}} or "
                "${file:/path} (write $${ for a literal ${)",
                path=path,
            )
        if reference not in environ:
            raise ConfigError(
                f"environment variable {reference} is not set (referenced as ${{{reference}}})",
                path=path,
            )
        return environ[reference]

    return _REFERENCE.sub(replace, text)


def _read_reference(file: str, path: str) -> str:
    """The text of `${file:<file>}`: a regular UTF-8 file of at most 1 MiB, without NULs."""
    what = f"${{file:{short(file)}}}"
    if not file:
        raise ConfigError(f"{what} names no file: write ${{file:/path/to/secret}}", path=path)
    data = read_bounded(Path(file), MAX_REFERENCED_BYTES, what=what, path_in_config=path)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{what} is not UTF-8 text", path=path) from None
    if "\0" in text:
        raise ConfigError(f"{what} holds a NUL character: no setting can hold one", path=path)
    return text.rstrip("\r\n")


def short(text: str, limit: int = 60) -> str:
    """`text` cut to `limit` characters for an error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
