"""From messages to HTTP requests: URL, headers and body, for one message or a batch of them.

A `RequestBuilder` is compiled from the sink's config once; `for_message` then only renders
templates and concatenates bytes. Every request carries `Idempotency-Key` (the message id, or
for a batch a hash of its messages' ids) and, when a secret is configured, the Standard
Webhooks signature headers over exactly the bytes sent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from busway import Message, PermanentError
from busway.adapters.http import cloudevents
from busway.adapters.http.signing import WebhookSigner
from busway.adapters.http.templates import MessageFields, Template

__all__ = ["Prepared", "Request", "RequestBuilder", "batch_id"]

_NDJSON = "application/x-ndjson"


_TRACE = ("traceparent", "tracestate")


@dataclass(frozen=True, slots=True)
class Prepared:
    """One message's request parts before batching: where to, with what, and its body."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes
    content_type: str
    message_id: str
    trace: tuple[tuple[str, str], ...] = ()
    """The message's W3C trace context (`traceparent`, `tracestate`), sent with a request of
    this message alone (a batch carries many traces, so none)."""


@dataclass(frozen=True, slots=True)
class Request:
    """A request ready to send, and the ids of the messages it carries."""

    method: str
    url: str
    headers: dict[str, str]
    body: bytes
    message_ids: tuple[str, ...]


class RequestBuilder:
    """Compiled URL / header templates, body mode, CloudEvents mode and signer of one sink."""

    def __init__(
        self,
        *,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: str,
        cloudevents_mode: str | None,
        event_source: str,
        signing_secret: str | None,
    ) -> None:
        self.method = method
        self.url = Template.compile(url, url=True)
        self.headers = [
            (name, Template.compile(value, url=False)) for name, value in headers.items()
        ]
        self.body_mode = body
        self.cloudevents = cloudevents_mode
        self.event_source = event_source
        self.signer = WebhookSigner(signing_secret) if signing_secret is not None else None

    def prepare(self, message: Message) -> Prepared:
        """The request parts of `message`; PermanentError if it cannot become a request."""
        fields = MessageFields(message)
        url = self.url.render(fields)
        headers = tuple((name, template.render(fields)) for name, template in self.headers)
        data = message.data
        if self.body_mode == "json":
            try:
                orjson.loads(data)
            except orjson.JSONDecodeError as exc:
                raise PermanentError(
                    f"message {message.id} on {message.subject} is not JSON ({exc}); this sink "
                    'sends JSON bodies (set body = "raw" to send bytes as they are)'
                ) from None
            content_type = "application/json"
        else:
            content_type = _header(message.headers, "Content-Type") or "application/octet-stream"
        if self.cloudevents is not None:
            attributes = cloudevents.event_attributes(
                message.headers,
                message_id=message.id,
                subject=message.subject,
                source=self.event_source,
            )
            if self.cloudevents == "binary":
                headers += tuple(cloudevents.binary_headers(attributes, content_type).items())
            else:
                data = cloudevents.structured_body(attributes, data, content_type)
                content_type = cloudevents.STRUCTURED
        trace = tuple(
            (name, value) for name in _TRACE if (value := message.headers.get(name)) is not None
        )
        return Prepared(self.method, url, headers, data, content_type, message.id, trace)

    def single(self, prepared: Prepared) -> Request:
        """The request of one message."""
        headers = dict(prepared.headers)
        headers.setdefault("Content-Type", prepared.content_type)
        for name, value in prepared.trace:  # the config's own headers win
            if not any(name == key.lower() for key in headers):
                headers[name] = value
        return self._finish(prepared, headers, prepared.body, (prepared.message_id,))

    def batch(self, batch: Sequence[Prepared], mode: str) -> Request:
        """One request carrying every message of `batch` (same method, URL and headers)."""
        first = batch[0]
        headers = dict(first.headers)
        if mode == "ndjson":
            body = b"\n".join(_one_line(p.body) for p in batch) + b"\n"
            content_type = _NDJSON
        else:
            body = b"[" + b",".join(p.body for p in batch) + b"]"
            content_type = (
                cloudevents.STRUCTURED_BATCH
                if self.cloudevents == "structured"
                else "application/json"
            )
        headers["Content-Type"] = content_type
        return self._finish(first, headers, body, tuple(p.message_id for p in batch))

    def _finish(
        self, prepared: Prepared, headers: dict[str, str], body: bytes, ids: tuple[str, ...]
    ) -> Request:
        key = ids[0] if len(ids) == 1 else batch_id(ids)
        headers["Idempotency-Key"] = key
        if self.signer is not None:
            headers.update(self.signer.headers(key, body))
        return Request(prepared.method, prepared.url, headers, body, ids)


def batch_id(ids: Sequence[str]) -> str:
    """A stable id for a batch: the same messages in the same order give the same id."""
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()
    return f"batch:{digest[:32]}"


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        lower = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lower), None)
    return value


def _one_line(body: bytes) -> bytes:
    """A JSON body as one NDJSON line (pretty-printed JSON is re-serialised compactly)."""
    return body if b"\n" not in body else orjson.dumps(orjson.loads(body))
