"""What an expression may know about a message besides its body: subject, headers, metadata.

`when` and `transform` evaluate over the JSON body; these functions reach the rest:

    subject()          the subject the message arrived on
    header('name')     a header's value, or null
    meta('stream')     'stream' | 'seq' | 'redelivered' (true from the second attempt on)
    now()              the current UTC time, ISO 8601
    uuid()             a random UUID (not deterministic: avoid it in ids of outputs)

A route builds a `MessageContext` per message only if its expressions call one of the first
three, so routes that do not use them pay nothing.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from busway.routers.expression import ExpressionRuntimeError, Function

__all__ = ["CONTEXT_FUNCTIONS", "MESSAGE_FUNCTIONS", "MessageContext"]


@dataclass(slots=True, frozen=True)
class MessageContext:
    """The parts of a delivery that are not its body."""

    subject: str
    headers: Mapping[str, str] | None
    stream: str
    sequence: int
    attempt: int


def _subject(context: MessageContext | None) -> str | None:
    return context.subject if context is not None else None


def _header(context: MessageContext | None, name: object) -> str | None:
    if not isinstance(name, str):
        raise ExpressionRuntimeError(
            "invalid-type", f"header() expects a string name, got {type(name).__name__}"
        )
    if context is None or not context.headers:
        return None
    return context.headers.get(name)


def _meta(context: MessageContext | None, key: object) -> Any:
    if key not in ("stream", "seq", "redelivered"):
        raise ExpressionRuntimeError(
            "invalid-value", f"meta() takes 'stream', 'seq' or 'redelivered', got {key!r}"
        )
    if context is None:
        return None
    if key == "stream":
        return context.stream
    if key == "seq":
        return context.sequence
    return context.attempt > 1


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _uuid() -> str:
    return str(uuid.uuid4())


#: Functions that read the message context: a route using any of them builds one per message.
MESSAGE_FUNCTIONS = (
    Function("subject", _subject, pass_context=True),
    Function("header", _header, min_args=1, max_args=1, pass_context=True),
    Function("meta", _meta, min_args=1, max_args=1, pass_context=True),
)

#: Every busway function available in `when` and `transform`.
CONTEXT_FUNCTIONS = (*MESSAGE_FUNCTIONS, Function("now", _now), Function("uuid", _uuid))
