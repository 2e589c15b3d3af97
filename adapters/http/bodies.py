"""From a request body to messages: JSON, NDJSON lines, opaque bytes, CloudEvents.

    content = "json"   application/json and */*+json: one message, checked to be JSON;
                       application/x-ndjson (or application/jsonl): one message per line;
                       application/cloudevents+json: a structured CloudEvent.
    content = "bytes"  any body, one message, unchecked; its Content-Type is kept in a header.

With `cloudevents = true` (the default) a request carrying `ce-specversion` is a binary-mode
CloudEvent: its `ce-*` headers are kept on the message and its body is the event's data.

JSON integers outside 64 bits ([-2^63, 2^64-1]) are refused with 400, the problem's `field`
pointing at the first one (`body/amount`, `body.line[3]/items/0/id`): past the source, routes
and adapters decode JSON with orjson, which turns such an integer into a float (silently
rounded), and cannot write one back at all. Send big numbers as strings.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec
import orjson

from busway.adapters.http import cloudevents
from busway.adapters.http.problems import Problem

__all__ = ["Item", "Kind", "kind_of", "ndjson_items", "single_item"]

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/ndjson"})
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what orjson decodes, and encodes, as an int
# Every integer of up to 18 digits fits; only a body with a longer run of digits (in a number
# or a string) is decoded again, exactly, to look for an integer beyond 64 bits.
_LONG_DIGITS = re.compile(rb"[0-9]{19}")


@dataclass(slots=True)
class Item:
    """One message to publish; `natural_id` is an id the input itself carries (CloudEvents)."""

    data: bytes
    headers: dict[str, str]
    natural_id: str | None = None


class Kind:
    """What a request body is, decided from its media type and headers."""

    JSON = "json"
    NDJSON = "ndjson"
    STRUCTURED_EVENT = "structured-event"
    BYTES = "bytes"


def media_type_of(content_type: str) -> str:
    """`application/json` from `application/json; charset=utf-8`."""
    return content_type.split(";", 1)[0].strip().lower()


def is_json(media_type: str) -> bool:
    """True for `application/json` and any `+json` suffix type."""
    return media_type == "application/json" or media_type.endswith("+json")


def kind_of(content_type: str, *, content: str, ndjson: bool, events: bool) -> str:
    """The body's kind, or Problem 415 if this source does not take it."""
    media_type = media_type_of(content_type)
    if content == "bytes":
        return Kind.BYTES
    if ndjson and media_type in NDJSON_TYPES:
        return Kind.NDJSON
    if events and media_type == cloudevents.STRUCTURED:
        return Kind.STRUCTURED_EVENT
    if events and media_type == cloudevents.STRUCTURED_BATCH:
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported Media Type",
            "CloudEvents batch mode is not supported: send events one by one, or as NDJSON",
            field="header.Content-Type",
        )
    if is_json(media_type):
        return Kind.JSON
    accepted = ["application/json"]
    if ndjson:
        accepted.append("application/x-ndjson")
    if events:
        accepted.append(cloudevents.STRUCTURED)
    raise Problem(
        415,
        "unsupported-media-type",
        "Unsupported Media Type",
        f"this endpoint takes {', '.join(accepted)}; got {content_type!r}",
        field="header.Content-Type",
    )


def single_item(
    body: bytes, content_type: str, kind: str, headers: Mapping[str, str], *, events: bool
) -> Item:
    """The one message of a JSON, bytes or CloudEvents request; Problem 400 if invalid."""
    if kind == Kind.STRUCTURED_EVENT:
        _check_integers(body, "body")
        try:
            data, event_headers = cloudevents.structured_message(body)
        except cloudevents.EventError as exc:
            raise Problem(
                400, "invalid-cloudevent", "Invalid CloudEvent", str(exc), field="body"
            ) from None
        return Item(data, event_headers, _event_id(event_headers))
    if kind == Kind.JSON:
        _check_json(body, "body")
    item_headers = {"Content-Type": content_type}
    natural_id = None
    if events:
        try:
            attributes = cloudevents.binary_attributes(headers)
        except cloudevents.EventError as exc:
            raise Problem(
                400, "invalid-cloudevent", "Invalid CloudEvent", str(exc), field="header.ce-*"
            ) from None
        if attributes is not None:
            item_headers.update(attributes)
            natural_id = _event_id(attributes)
    return Item(body, item_headers, natural_id)


def ndjson_items(body: bytes, max_lines: int) -> list[tuple[int, Item | Problem]]:
    """(line number, message or the line's problem) for each non-blank line, 1-based."""
    lines = body.split(b"\n")
    if lines and not lines[-1].strip():
        lines.pop()
    if len(lines) > max_lines:
        raise Problem(
            413,
            "too-many-lines",
            "Payload Too Large",
            f"the body has {len(lines)} lines; this endpoint takes at most {max_lines}",
            field="body",
        )
    items: list[tuple[int, Item | Problem]] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped:
            continue
        try:
            _check_json(stripped, f"body.line[{number}]")
        except Problem as bad:
            items.append((number, bad))
            continue
        items.append((number, Item(stripped, {"Content-Type": "application/json"})))
    if not items:
        raise Problem(400, "empty-body", "Empty Body", "the NDJSON body has no lines", field="body")
    return items


def _check_json(data: bytes, where: str) -> None:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise Problem(
            400,
            "invalid-json",
            "Invalid JSON",
            f"the {where} is not JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}",
            field=where,
        ) from None
    _check_integers(data, where)


def _check_integers(data: bytes, where: str) -> None:
    """Problem 400 naming the first integer of the JSON `data` that does not fit 64 bits."""
    if _LONG_DIGITS.search(data) is None:
        return
    try:
        document = msgspec.json.decode(data)  # integers exactly, however long
    except msgspec.DecodeError:
        return  # orjson took it; nothing more to say
    found = _wide_integer(document)
    if found is None:
        return
    pointer, value = found
    digits = str(value)
    shown = digits if len(digits) <= 40 else f"{digits[:20]}...({len(digits)} digits)"
    raise Problem(
        400,
        "integer-out-of-range",
        "Integer Out Of Range",
        f"the integer {shown} at {where}{pointer} does not fit 64 bits ([-2^63, 2^64-1]); "
        "it would be rounded on its way through the bus: send it as a string",
        field=f"{where}{pointer}",
    )


def _wide_integer(document: Any) -> tuple[str, int] | None:
    """(JSON pointer, value) of the first integer out of range, in document order."""
    stack: list[tuple[str, Any]] = [("", document)]
    while stack:
        pointer, value = stack.pop()
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT_MIN <= value <= _INT_MAX:
                return pointer, value
        elif isinstance(value, dict):
            children = [(f"{pointer}/{_escape(key)}", item) for key, item in value.items()]
            stack.extend(reversed(children))
        elif isinstance(value, list):
            stack.extend(reversed([(f"{pointer}/{i}", item) for i, item in enumerate(value)]))
    return None


def _escape(key: str) -> str:
    """A member name as a JSON pointer token (RFC 6901)."""
    return key.replace("~", "~0").replace("/", "~1")


def _event_id(headers: Mapping[str, str]) -> str:
    """`ce-source` + `ce-id` identify an event (CloudEvents 1.0): a stable dedup id."""
    identity = f"{headers['ce-source']}\n{headers['ce-id']}".encode()
    return "ce:" + hashlib.sha256(identity).hexdigest()[:32]
