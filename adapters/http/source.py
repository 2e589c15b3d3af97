"""The `http` source: POST a message, get 202 once JetStream has stored it.

    [[sources]]
    name = "orders-api"
    type = "http"
    path = "/orders"
    subject = "orders.received"

Answers:

* 202 `{"id", "stream", "seq", "duplicate"}`: stored (on disk with the embedded server's
  default `sync = "always"`); `duplicate` is true when the `Idempotency-Key` was seen before;
* 400 body is not valid JSON, or a bad `Idempotency-Key`; 413 body over `max_body`;
  415 not `application/json` when `content = "json"`;
* 503 with `Retry-After` when JetStream did not confirm (down, stream full, timeout).

An `Idempotency-Key` header becomes the `Nats-Msg-Id` (prefixed with the source name), so a
client retrying after a lost answer does not create a second message within the stream's
duplicate window.
"""

from __future__ import annotations

import uuid
from typing import Literal

import anyio
import msgspec
import orjson
from anyio.abc import TaskStatus
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from busway import BuildContext, PublishError, Source, SourceConfig, SourceContext
from busway.adapters.http.problems import problem

__all__ = ["HttpSource", "HttpSourceConfig"]

_MAX_KEY_LENGTH = 200


class HttpSourceConfig(SourceConfig, tag="http", frozen=True, kw_only=True):
    """An ingest endpoint on the shared listener."""

    path: str
    methods: list[str] = msgspec.field(default_factory=lambda: ["POST"])
    content: Literal["json", "bytes"] = "json"
    max_body: int = 1024 * 1024
    retry_after: int = 1

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.max_body < 1:
            raise ValueError("max_body must be at least 1 byte")


class HttpSource(Source):
    """Publishes each accepted request body to `subject`, answering after the PubAck."""

    def __init__(self, config: HttpSourceConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self._context: SourceContext | None = None

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Mount the endpoint on the shared listener and serve until cancelled."""
        self._context = context
        context.add_http_route(
            Route(self.config.path, self.ingest, methods=self.config.methods, name=context.name)
        )
        context.logger.info(
            "accepting %s %s -> %s",
            "/".join(self.config.methods),
            self.config.path,
            self.config.subject,
        )
        task_status.started()
        await anyio.sleep_forever()

    async def ingest(self, request: Request) -> Response:
        """Validate, publish, and answer 202 only once JetStream confirmed the message."""
        context = self._context
        assert context is not None, "HttpSource.ingest called before run()"
        stats = context.stats
        stats.received += 1
        config = self.config
        content_type = request.headers.get("content-type", "application/octet-stream")
        if config.content == "json" and not _is_json(content_type):
            stats.count_error("unsupported_media_type")
            return problem(
                415,
                "unsupported-media-type",
                "Unsupported Media Type",
                f"this endpoint takes application/json, got {content_type!r}",
            )
        try:
            body = await self._read_body(request)
        except ClientDisconnect:
            stats.count_error("client_disconnected")  # nothing was published
            return Response(status_code=400)
        if body is None:
            stats.count_error("too_large")
            return problem(
                413,
                "payload-too-large",
                "Payload Too Large",
                f"the body exceeds this endpoint's max_body of {config.max_body} bytes",
            )
        if config.content == "json":
            try:
                orjson.loads(body)
            except orjson.JSONDecodeError as exc:
                stats.count_error("bad_json")
                return problem(400, "invalid-json", "Invalid JSON", f"the body is not JSON: {exc}")
        key = request.headers.get("idempotency-key")
        if key is not None and not _valid_key(key):
            stats.count_error("bad_idempotency_key")
            return problem(
                400,
                "invalid-idempotency-key",
                "Invalid Idempotency-Key",
                f"Idempotency-Key must be 1-{_MAX_KEY_LENGTH} printable ASCII characters",
            )
        message_id = f"{context.name}:{key}" if key else f"{context.name}:{uuid.uuid4().hex}"
        headers = {"Content-Type": content_type, "Nats-Msg-Id": message_id}
        try:
            ack = await context.publisher.publish(config.subject, body, headers=headers)
        except PublishError as exc:
            stats.count_error("publish")
            context.logger.warning("503 for %s: %s", config.path, exc)
            return problem(
                503,
                "unavailable",
                "Service Unavailable",
                f"the message was not stored, retry later: {exc}",
                headers={"Retry-After": str(config.retry_after)},
            )
        stats.published += 1
        answer = {
            "id": message_id,
            "stream": ack.stream,
            "seq": ack.sequence,
            "duplicate": ack.duplicate,
        }
        return Response(orjson.dumps(answer), status_code=202, media_type="application/json")

    async def _read_body(self, request: Request) -> bytes | None:
        """The body, or None as soon as it exceeds `max_body` (never buffering more)."""
        limit = self.config.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None
        chunks = bytearray()
        async for chunk in request.stream():
            chunks += chunk
            if len(chunks) > limit:
                return None
        return bytes(chunks)


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


def _valid_key(key: str) -> bool:
    return 0 < len(key) <= _MAX_KEY_LENGTH and key.isascii() and key.isprintable()
