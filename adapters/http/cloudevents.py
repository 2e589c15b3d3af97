"""CloudEvents 1.0 over HTTP, both content modes, in and out.

Inside the bus an event is a message whose body is the event's `data` and whose headers carry
its attributes as `ce-<name>` (the HTTP binary-mode names, values percent-encoded as that
binding says), plus `Content-Type` for `datacontenttype`. That one representation serves both
modes, so a route or sink never cares how an event arrived:

* **binary** mode in: `ce-*` request headers are kept as they are; the body is `data`;
* **structured** mode in (`application/cloudevents+json`): the JSON envelope is split into
  `data` (the body) and attributes (headers);
* out, `binary_headers` / `structured_body` rebuild either mode from a message, filling what a
  plain (non-event) message lacks: `id` = the message id, `type` = its subject, `source` from the
  sink's config.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from urllib.parse import quote, unquote

import orjson

__all__ = [
    "STRUCTURED",
    "STRUCTURED_BATCH",
    "EventError",
    "binary_attributes",
    "binary_headers",
    "event_attributes",
    "structured_body",
    "structured_message",
]

STRUCTURED = "application/cloudevents+json"
STRUCTURED_BATCH = "application/cloudevents-batch+json"
REQUIRED = ("specversion", "id", "source", "type")
_NAME = re.compile(r"^[a-z0-9]{1,40}$")
# The HTTP binding percent-encodes space, '"', '%' and everything outside printable ASCII.
_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


class EventError(ValueError):
    """A request that claims to be a CloudEvent but is not a valid one."""


def binary_attributes(headers: Mapping[str, str]) -> dict[str, str] | None:
    """The `ce-*` headers of a binary-mode event, or None if the request is not one."""
    attributes = {
        key.lower(): value for key, value in headers.items() if key.lower().startswith("ce-")
    }
    if "ce-specversion" not in attributes:
        return None
    _check_required({key[3:]: unquote(value) for key, value in attributes.items()})
    for key in attributes:
        if not _NAME.match(key[3:]):
            raise EventError(f"invalid CloudEvents attribute header {key!r}: expected ce-[a-z0-9]+")
    return attributes


def structured_message(body: bytes) -> tuple[bytes, dict[str, str]]:
    """(data, headers) of a structured-mode event: `ce-*` attributes plus `Content-Type`."""
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise EventError(f"the structured CloudEvent is not JSON: {exc}") from None
    if not isinstance(event, dict):
        raise EventError("a structured CloudEvent must be a JSON object")
    _check_required(event)
    content_type = event.pop("datacontenttype", None)
    if content_type is not None and not isinstance(content_type, str):
        raise EventError("datacontenttype must be a string")
    data = _event_data(event, content_type)
    headers = {"Content-Type": content_type or "application/json"}
    for name, value in event.items():
        if not _NAME.match(name):
            raise EventError(f"invalid CloudEvents attribute name {name!r}: expected [a-z0-9]+")
        text = value if isinstance(value, str) else orjson.dumps(value).decode()
        headers[f"ce-{name}"] = quote(text, safe=_SAFE)
    return data, headers


def event_attributes(
    headers: Mapping[str, str], *, message_id: str, subject: str, source: str
) -> dict[str, str]:
    """A message's event attributes (decoded), defaults filled for a plain message."""
    attributes = {
        "specversion": "1.0",
        "id": message_id,
        "source": source,
        "type": subject,
    }
    for key, value in headers.items():
        lower = key.lower()
        if lower.startswith("ce-") and _NAME.match(lower[3:]):
            attributes[lower[3:]] = unquote(value)
    return attributes


def binary_headers(attributes: Mapping[str, str], content_type: str) -> dict[str, str]:
    """Binary-mode request headers for `attributes`."""
    headers = {f"ce-{name}": quote(value, safe=_SAFE) for name, value in attributes.items()}
    headers["Content-Type"] = content_type
    return headers


def structured_body(attributes: Mapping[str, str], data: bytes, content_type: str) -> bytes:
    """A structured-mode JSON event: `data` inline when it is JSON or text, else base64."""
    event: dict[str, object] = dict(attributes)
    event["datacontenttype"] = content_type
    if data:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type == "application/json" or media_type.endswith("+json"):
            try:
                orjson.loads(data)
            except orjson.JSONDecodeError:
                event["data_base64"] = base64.b64encode(data).decode()
            else:
                event["data"] = orjson.Fragment(data)
        elif media_type.startswith("text/"):
            try:
                event["data"] = data.decode()
            except UnicodeDecodeError:
                event["data_base64"] = base64.b64encode(data).decode()
        else:
            event["data_base64"] = base64.b64encode(data).decode()
    return orjson.dumps(event)


def _check_required(attributes: Mapping[str, object]) -> None:
    missing = [name for name in REQUIRED if not attributes.get(name)]
    if missing:
        raise EventError(f"CloudEvent without required attribute(s): {', '.join(missing)}")
    if attributes["specversion"] != "1.0":
        raise EventError(f"unsupported CloudEvents specversion {attributes['specversion']!r}")
    for name in REQUIRED:
        if not isinstance(attributes[name], str):
            raise EventError(f"CloudEvents attribute {name!r} must be a string")


def _event_data(event: dict[str, object], content_type: str | None) -> bytes:
    if "data_base64" in event:
        encoded = event.pop("data_base64")
        if "data" in event or not isinstance(encoded, str):
            raise EventError("data_base64 must be a string, and not given together with data")
        try:
            return base64.b64decode(encoded, validate=True)
        except binascii.Error:
            raise EventError("data_base64 is not valid base64") from None
    if "data" not in event:
        return b""
    data = event.pop("data")
    media_type = (content_type or "application/json").split(";", 1)[0].strip().lower()
    is_json = media_type == "application/json" or media_type.endswith("+json")
    if isinstance(data, str) and not is_json:
        return data.encode()
    return orjson.dumps(data)
