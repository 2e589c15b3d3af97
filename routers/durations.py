"""Human durations in config: `"500ms"`, `"5s"`, `"2m"`, `"1h"`, or a number of seconds."""

from __future__ import annotations

import re
from typing import Any

__all__ = ["Duration", "decode_hook", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")


class Duration(float):
    """Seconds, decoded from a number or a string such as `"250ms"` or `"2m"`."""

    def __repr__(self) -> str:
        return f"Duration({float(self)!r})"


def parse_duration(value: object) -> Duration:
    """Seconds from `value`; raises ValueError saying what is accepted."""
    if isinstance(value, bool):
        # ValueError, not TypeError: msgspec reports either with the key path, and to a user
        # `true` is simply not a valid duration.
        raise ValueError(  # noqa: TRY004
            f"expected a duration such as '500ms', '5s' or '2m', got {value!r}"
        )
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return Duration(value)
    if isinstance(value, str):
        found = _PATTERN.match(value)
        if found:
            return Duration(float(found.group(1)) * _UNITS[found.group(2)])
    raise ValueError(
        f"expected a duration such as '500ms', '5s', '2m' or a number of seconds, got {value!r}"
    )


def decode_hook(kind: type, value: Any) -> Any:
    """msgspec `dec_hook` that decodes `Duration` fields from numbers or strings."""
    if kind is Duration:
        return parse_duration(value)
    raise NotImplementedError(kind)
