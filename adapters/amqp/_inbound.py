"""What the source makes of one AMQP delivery: its message id, its headers, and whether it is
well-formed. Pure functions over plain values, so they are tested without a broker.

Message ids (the `Nats-Msg-Id` JetStream deduplicates on):

* `<source>:<message_id>` when the publisher set the AMQP `message_id` property (printable
  ASCII); a redelivery, or the same message published again, is stored once.
* `<source>:sha256:<hash>` otherwise: a hash of the body, exchange, routing key and every
  property and header. A redelivery carries all of them unchanged, so it is stored once; two
  *distinct* messages identical in all of them, arriving within the stream's
  `duplicate_window`, are stored once too. Publishers that may send identical messages on
  purpose must set `message_id` (and `require_message_id = true` enforces it). The delivery
  tag is never used: it is per channel and starts again at 1 on every connection, so it would
  name different messages alike after a reconnect (and so lose them).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

__all__ = ["Delivered", "headers_of", "malformed_reason", "message_id"]

_PRINTABLE = re.compile(r"^[\x21-\x7e]{1,255}$")
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$")
_RESERVED = ("nats-", "busway-")
_JSON_TYPES = ("application/json",)
_IDENTITY = ("", "identity", "utf-8", "utf8")


@dataclass(frozen=True, slots=True)
class Delivered:
    """The parts of an AMQP delivery busway reads (copied out of the client's message)."""

    body: bytes
    exchange: str
    routing_key: str
    message_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    correlation_id: str | None = None
    reply_to: str | None = None
    type: str | None = None
    app_id: str | None = None
    user_id: str | None = None
    timestamp: datetime | None = None
    headers: Mapping[str, Any] | None = None
    redelivered: bool = False


def message_id(source: str, delivered: Delivered) -> str:
    """The Nats-Msg-Id of `delivered` (see the module docstring)."""
    if delivered.message_id and _PRINTABLE.match(delivered.message_id):
        return f"{source}:{delivered.message_id}"
    identity = repr(
        (
            delivered.exchange,
            delivered.routing_key,
            delivered.message_id,
            delivered.content_type,
            delivered.content_encoding,
            delivered.correlation_id,
            delivered.reply_to,
            delivered.type,
            delivered.app_id,
            delivered.user_id,
            delivered.timestamp.isoformat() if delivered.timestamp else None,
            sorted((str(k), repr(v)) for k, v in (delivered.headers or {}).items()),
        )
    ).encode()
    digest = hashlib.sha256(identity + b"\0" + delivered.body).hexdigest()[:40]
    return f"{source}:sha256:{digest}"


def malformed_reason(delivered: Delivered, *, json: bool, require_id: bool) -> str | None:
    """Why `delivered` cannot be taken (one line naming the property), or None if it can."""
    if require_id and not delivered.message_id:
        return "no message_id property, and the source has require_message_id = true"
    if not json:
        return None
    content_type = (delivered.content_type or "").split(";", 1)[0].strip().lower()
    if content_type and content_type not in _JSON_TYPES and not content_type.endswith("+json"):
        return f"content type {delivered.content_type!r} is not JSON (the source has format = json)"
    encoding = (delivered.content_encoding or "").strip().lower()
    if encoding not in _IDENTITY:
        return (
            f"content encoding {delivered.content_encoding!r} is not supported "
            "(the source takes identity / utf-8 JSON)"
        )
    try:
        orjson.loads(delivered.body)
    except orjson.JSONDecodeError as exc:
        return f"body is not JSON: {exc}"
    return None


def _text(value: Any) -> str | None:
    """`value` as a header value, or None if it is not a scalar or holds a line break."""
    if isinstance(value, bytes):
        try:
            value = value.decode()
        except UnicodeDecodeError:
            return None
    if isinstance(value, bool):
        value = "true" if value else "false"
    elif isinstance(value, int | float):
        value = str(value)
    elif isinstance(value, datetime):
        value = value.isoformat()
    if not isinstance(value, str) or any(c in value for c in "\r\n\0"):
        return None
    return value


def headers_of(delivered: Delivered, msg_id: str) -> dict[str, str]:
    """The NATS headers of the stored message: the id, the AMQP routing data and properties,
    and the application headers that are scalars under a valid name. Headers named `Nats-*`
    or `Busway-*` are dropped: a remote publisher must not choose a dedup id or pose as
    busway metadata."""
    headers: dict[str, str] = {"Nats-Msg-Id": msg_id}
    for name, value in (delivered.headers or {}).items():
        text = _text(value)
        if text is not None and _HEADER_NAME.match(name) and not name.lower().startswith(_RESERVED):
            headers[name] = text
    properties = {
        "Amqp-Exchange": delivered.exchange,
        "Amqp-Routing-Key": delivered.routing_key,
        "Amqp-Message-Id": delivered.message_id,
        "Content-Type": delivered.content_type,
        "Content-Encoding": delivered.content_encoding,
        "Amqp-Correlation-Id": delivered.correlation_id,
        "Amqp-Reply-To": delivered.reply_to,
        "Amqp-Type": delivered.type,
        "Amqp-App-Id": delivered.app_id,
        "Amqp-User-Id": delivered.user_id,
        "Amqp-Timestamp": delivered.timestamp,
    }
    for name, value in properties.items():
        text = _text(value) if value is not None else None
        if text:
            headers[name] = text
    return headers
