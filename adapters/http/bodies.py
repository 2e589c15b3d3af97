"""From a request body to messages: JSON, NDJSON lines, opaque bytes, CloudEvents.

    content = "json"   application/json and */*+json: one message, checked to be JSON;
                       application/x-ndjson (or application/jsonl): one message per line;
                       application/cloudevents+json: a structured CloudEvent.
    content = "bytes"  any body, one message, unchecked; its Content-Type is kept in a header.

With `cloudevents = true` (the default) a request carrying `ce-specversion` is a binary-mode
CloudEvent: its `ce-*` headers are kept on the message and its body is the event's data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import orjson

from busway.adapters.http import cloudevents
from busway.adapters.http.problems import Problem

__all__ = ["Item", "Kind", "kind_of", "ndjson_items", "single_item"]

NDJSON_TYPES = frozenset({"application/x-ndjson", "application/jsonl", "application/ndjson"})


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
            400, "invalid-json", "Invalid JSON", f"the {where} is not JSON: {exc}", field=where
        ) from None


def _event_id(headers: Mapping[str, str]) -> str:
    """`ce-source` + `ce-id` identify an event (CloudEvents 1.0): a stable dedup id."""
    identity = f"{headers['ce-source']}\n{headers['ce-id']}".encode()
    return "ce:" + hashlib.sha256(identity).hexdigest()[:32]
