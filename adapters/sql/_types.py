"""Database values as JSON, and watermarks as JSON that decode back to the same values.

| database value                    | JSON                                                   |
|-----------------------------------|--------------------------------------------------------|
| integer, boolean, text            | number, true/false, string                             |
| float (real, double)              | number                                                 |
| numeric / decimal                 | string, exact digits (`"1234.500000"`): never a float  |
| timestamp with time zone          | string, ISO 8601 with offset (`...T10:00:00.123456+00:00`) |
| timestamp / datetime (no zone)    | string, ISO 8601, taken as UTC (`+00:00`)              |
| date, time                        | string, ISO 8601 (`2024-02-29`, `10:00:00.5`)          |
| interval / MySQL TIME             | string, ISO 8601 duration (`P1DT3600.5S`)              |
| UUID                              | string                                                 |
| bytes (bytea, BLOB)               | string, base64 (standard alphabet, padded)             |
| json / jsonb (and `json_columns`) | the JSON itself, embedded                              |
| NULL                              | null                                                   |

Decimals are strings because a JSON number is a float to most readers: `0.1 + 0.2` and
20-digit amounts would silently round. A consumer that wants a number converts it knowingly.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import uuid
from collections.abc import Sequence
from typing import Any

import orjson

__all__ = ["JsonText", "decode_watermark", "encode_row", "encode_watermark", "render_value"]

# Subclasses of str reach `_default`, so `JsonText` is embedded rather than quoted; a naive
# datetime is written as UTC.
_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_PASSTHROUGH_SUBCLASS


class JsonText(str):
    """JSON text the database already validated (a json/jsonb column): embedded as is."""

    __slots__ = ()


def _default(value: Any) -> Any:
    if isinstance(value, JsonText):
        return orjson.Fragment(str(value))
    if isinstance(value, str):
        return str(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, list):
        return list(value)
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime.timedelta):
        return _duration(value)
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    # ipaddress objects, ranges, enums, anything with a faithful text form.
    return str(value)


def _duration(value: datetime.timedelta) -> str:
    sign = "-" if value < datetime.timedelta(0) else ""
    value = abs(value)
    seconds = value.seconds + value.microseconds / 1_000_000
    text = f"{seconds:.6f}".rstrip("0").rstrip(".")
    return f"{sign}P{value.days}DT{text}S" if value.days else f"{sign}PT{text}S"


def encode_row(columns: Sequence[str], row: Sequence[Any], json_columns: frozenset[str]) -> bytes:
    """One row as a JSON object of column -> value, mapped as the module docstring says.

    Raises ValueError when a `json_columns` value is not valid JSON.
    """
    document: dict[str, Any] = dict(zip(columns, row, strict=True))
    for column in json_columns.intersection(document):
        value = document[column]
        if isinstance(value, JsonText):
            continue  # already JSON, and embedded as such
        if isinstance(value, str | bytes):
            try:
                document[column] = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"column {column!r} is not valid JSON: {exc}") from None
    return orjson.dumps(document, default=_default, option=_OPTIONS)


def render_value(value: Any) -> str:
    """A value as text for message ids: the JSON mapping's text, without JSON quoting."""
    if isinstance(value, str):
        return value
    rendered = orjson.loads(orjson.dumps(value, default=_default, option=_OPTIONS))
    return rendered if isinstance(rendered, str) else orjson.dumps(rendered).decode()


# A watermark is stored as a JSON list of [tag, text] pairs so it comes back as the same Python
# type it was read as: a datetime compares as a timestamp, a Decimal as a number, in every
# engine, instead of as a string that only sometimes casts the same way.
_ENCODERS: list[tuple[type, str]] = [
    (bool, "bool"),
    (int, "int"),
    (float, "float"),
    (decimal.Decimal, "decimal"),
    (datetime.datetime, "datetime"),
    (datetime.date, "date"),
    (datetime.time, "time"),
    (uuid.UUID, "uuid"),
    (str, "str"),
]
_DECODERS: dict[str, Any] = {
    "bool": lambda text: text == "true",
    "int": int,
    "float": float,
    "decimal": decimal.Decimal,
    "datetime": datetime.datetime.fromisoformat,
    "date": datetime.date.fromisoformat,
    "time": datetime.time.fromisoformat,
    "uuid": uuid.UUID,
    "str": str,
}


def encode_watermark(values: Sequence[Any]) -> bytes:
    """`values` (of a row's watermark columns) as bytes for the state store."""
    pairs: list[list[str]] = []
    for value in values:
        for kind, tag in _ENCODERS:
            if isinstance(value, kind):
                if tag == "bool":
                    text = "true" if value else "false"
                elif isinstance(value, datetime.date | datetime.time):
                    text = value.isoformat()
                else:
                    text = str(value)
                pairs.append([tag, text])
                break
        else:
            raise TypeError(
                f"a watermark column holds {type(value).__name__} values; use an integer, "
                "number, text, date/time or UUID column"
            )
    return orjson.dumps(pairs)


def decode_watermark(data: bytes) -> list[Any]:
    """The values `encode_watermark` stored."""
    return [_DECODERS[tag](text) for tag, text in orjson.loads(data)]
