"""Human durations in config: `"500ms"`, `"5s"`, `"2m"`, `"1h"`, or a number of seconds.

A duration is finite, not negative and at most `MAX_SECONDS` (about 100 years): every one ends
up in a timer, a `sleep` or a JetStream setting counted in int64 nanoseconds, where `inf`, `nan`
or 10^30 seconds would fail (or overflow) only at run time.
"""

from __future__ import annotations

import math
import re
from typing import Any

__all__ = ["MAX_SECONDS", "Duration", "decode_hook", "parse_duration"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$", re.ASCII)

MAX_SECONDS = 100 * 365 * 86400.0
"""The longest duration accepted: 100 years, far below int64 nanoseconds (292 years)."""


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
    if isinstance(value, int) and abs(value) > MAX_SECONDS:
        return _bounded(math.inf if value > 0 else -math.inf, value)  # float() would overflow
    if isinstance(value, int | float):
        return _bounded(float(value), value)
    if isinstance(value, str):
        found = _PATTERN.match(value)
        if found:
            return _bounded(float(found.group(1)) * _UNITS[found.group(2)], value)
    raise ValueError(
        "expected a duration such as '500ms', '5s', '2m' or a number of seconds, "
        f"got {_shown(value)}"
    )


def _bounded(seconds: float, value: object) -> Duration:
    if math.isnan(seconds):
        raise ValueError("a duration must be a number of seconds, got nan")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {_shown(value)}")
    if seconds > MAX_SECONDS:
        raise ValueError(f"a duration must be at most 100 years, got {_shown(value)}")
    return Duration(seconds + 0.0)  # -0.0 becomes 0.0


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


def decode_hook(kind: type, value: Any) -> Any:
    """msgspec `dec_hook` that decodes `Duration` fields from numbers or strings."""
    if kind is Duration:
        return parse_duration(value)
    raise NotImplementedError(kind)
