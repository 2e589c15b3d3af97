"""W3C trace context (`traceparent`, `tracestate`) as busway carries it, without OpenTelemetry.

Trace context travels in message headers and needs no library: an HTTP source keeps a caller's
`traceparent` and `tracestate` (when valid), every output of a route inherits its input's
headers (splits and switches included), dead letters keep them, and the HTTP sink sends them
on. This module only reads them: validity (a hostile header must not travel), the trace id
for log lines, the sampled flag.

Spans are opt-in (`[tracing] enabled`) and live in `busway._observe.spans`, the one module that
imports OpenTelemetry, imported only when tracing is on: with it off, a message costs one
`is None` test per hop.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = [
    "TRACEPARENT",
    "TRACESTATE",
    "is_sampled",
    "log_extra",
    "looks_unsampled",
    "trace_headers",
    "trace_id",
    "valid_traceparent",
]

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_UNSAMPLED_LAST = frozenset("02468ace")
"""The last hex digit of the flags of an unsampled `traceparent` (bit 0 clear)."""
_MAX_TRACESTATE = 512
"""W3C: 32 list members at most; vendors are asked to propagate at least 512 characters."""


def valid_traceparent(value: str) -> bool:
    """Whether `value` is a W3C `traceparent` busway may carry: `00-<trace>-<parent>-<flags>`,
    lowercase hex, ids not all zero (version `00`'s exact form, 55 characters)."""
    return _TRACEPARENT.fullmatch(value) is not None


def looks_unsampled(traceparent: str) -> bool:
    """A quick look at the flags of a 55-character `traceparent`: not sampled. The hot path
    of a hop with tracing on: an unsampled message is forwarded untouched, so its header
    needs no full check (a malformed one is only passed on, as it came)."""
    return len(traceparent) == 55 and traceparent[54] in _UNSAMPLED_LAST


def trace_headers(traceparent: str | None, tracestate: str | None) -> dict[str, str]:
    """The trace headers a message may carry from these request values: a valid
    `traceparent`, and its `tracestate` if short and printable; nothing if invalid."""
    if traceparent is None or not valid_traceparent(traceparent.strip()):
        return {}
    carried = {TRACEPARENT: traceparent.strip()}
    if tracestate and len(tracestate) <= _MAX_TRACESTATE and tracestate.isprintable():
        carried[TRACESTATE] = tracestate
    return carried


def trace_id(headers: Mapping[str, str] | None) -> str | None:
    """The trace id of the message's `traceparent`, or None (no header, or a bad one)."""
    if not headers:
        return None
    parent = headers.get(TRACEPARENT)
    if parent is None or not valid_traceparent(parent):
        return None
    return parent[3:35]


def is_sampled(traceparent: str) -> bool:
    """The sampled flag of a valid `traceparent`: its trace is being recorded upstream."""
    return int(traceparent[53:], 16) & 1 == 1


def log_extra(headers: Mapping[str, str] | None) -> dict[str, str]:
    """`extra=` for a log line about one message: its `trace_id` when it carries one, so a
    log search finds the trace and the trace finds the log."""
    found = trace_id(headers)
    return {"trace_id": found} if found else {}
