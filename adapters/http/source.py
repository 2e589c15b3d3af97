"""The `http` source: POST a message, get 202 once JetStream has stored it.

    [[sources]]
    name = "orders-api"
    type = "http"
    path = "/orders/{region}"
    subject = "orders.{region}"

A request goes through, in this order: authentication (`auth`, 401), the client's rate limit
(`rate_limit`, 429), the media type (415), the size (`max_body`, 413), the body's validity
(400), then JetStream. Answers:

* 202 `{"id", "stream", "seq", "duplicate"}`: stored (on disk with the embedded server's
  default `sync = "always"`); `duplicate` is true when the `Idempotency-Key` was seen before;
* NDJSON: one message per line, all published pipelined, then one answer listing every line
  (see `ndjson.py`): 202 all stored, 207 some, 400 or 503 none;
* 400 bad JSON, bad CloudEvent, bad `Idempotency-Key`, or a path parameter that cannot be a
  subject token; 413 over `max_body`; 415 a media type this source does not take;
* 503 with `Retry-After` when JetStream did not confirm (down, stream full, timeout).

An `Idempotency-Key` header becomes the `Nats-Msg-Id` (prefixed with the source name, and
suffixed with `:<line>` for NDJSON), so a client retrying after a lost answer does not create a
second message within the stream's duplicate window. A CloudEvent without one is identified by
its `source` and `id`.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import orjson
from anyio.abc import TaskStatus
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from busway import BuildContext, Duration, PublishError, Source, SourceConfig, SourceContext
from busway.adapters.http.auth import AuthConfig, Authenticator, AuthFailure, Identity
from busway.adapters.http.bodies import Item, Kind, kind_of, ndjson_items, single_item
from busway.adapters.http.ndjson import publish_lines
from busway.adapters.http.paths import SubjectTemplate, UnsafeToken, path_parameters
from busway.adapters.http.problems import Problem
from busway.adapters.http.ratelimit import RateLimitConfig, RateLimiter

__all__ = ["HttpSource", "HttpSourceConfig"]

_MAX_KEY_LENGTH = 200
_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Metric reasons (busway_errors_total) of the problems whose slug reads differently.
_REASONS = {
    "payload-too-large": "too_large",
    "too-many-lines": "too_large",
    "invalid-json": "bad_json",
    "invalid-idempotency-key": "bad_idempotency_key",
    "rate-limited": "rate_limited",
}


class HttpSourceConfig(SourceConfig, tag="http", frozen=True, kw_only=True):
    """An ingest endpoint on the shared listener."""

    path: str
    methods: list[str] = msgspec.field(default_factory=lambda: ["POST"])
    content: Literal["json", "bytes"] = "json"
    ndjson: bool = True
    max_lines: int = 10_000
    cloudevents: bool = True
    max_body: int = 1024 * 1024
    retry_after: int = 1
    auth: AuthConfig | None = None
    rate_limit: RateLimitConfig | None = None
    reply_timeout: Duration | None = None
    """Request-reply mode: wait this long for a route's `reply` stage and answer with it."""

    def __post_init__(self) -> None:
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.max_body < 1:
            raise ValueError("max_body must be at least 1 byte")
        if self.max_lines < 1:
            raise ValueError("max_lines must be at least 1")
        if not self.methods or any(m not in _METHODS for m in self.methods):
            raise ValueError(f"methods must be a non-empty subset of {sorted(_METHODS)}")
        SubjectTemplate.compile(self.subject, self.path)


class HttpSource(Source):
    """Publishes each accepted request body to `subject`, answering after the PubAck."""

    def __init__(self, config: HttpSourceConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.subject = SubjectTemplate.compile(config.subject, config.path)
        self._parameters = path_parameters(config.path)
        build = context or BuildContext(base_dir=Path.cwd())
        self.auth = Authenticator(config.auth, build) if config.auth is not None else None
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit is not None else None
        self._context: SourceContext | None = None

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Mount the endpoint on the shared listener and serve until cancelled."""
        self._context = context
        if self.auth is not None:
            await self.auth.start()
            if self.auth.jwks is not None and self.auth.jwks.last_error:
                context.logger.warning(
                    "%s; tokens are refused until it loads", self.auth.jwks.last_error
                )
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
        """Check, publish, and answer only once JetStream confirmed what was accepted."""
        context = self._context
        assert context is not None, "HttpSource.ingest called before run()"
        try:
            return await self._ingest(request, context)
        except Problem as answer:
            context.stats.count_error(_REASONS.get(answer.slug, answer.slug.replace("-", "_")))
            return answer.response()

    async def _ingest(self, request: Request, context: SourceContext) -> Response:
        config = self.config
        identity = await self._admit(request)
        self._limit(identity, request)
        subject = self._subject(request)
        content_type = request.headers.get("content-type", "application/octet-stream")
        kind = kind_of(
            content_type, content=config.content, ndjson=config.ndjson, events=config.cloudevents
        )
        body = await self._read_body(request)
        key = _idempotency_key(request)
        if kind == Kind.NDJSON and config.reply_timeout is not None:
            raise Problem(
                415,
                "unsupported-media-type",
                "Unsupported Media Type",
                "NDJSON batches are not accepted in request-reply mode: send one message",
                field="header.Content-Type",
            )
        if kind == Kind.NDJSON:
            lines = ndjson_items(body, config.max_lines)
            context.stats.received += len(lines)
            prefix = f"{context.name}:{key or uuid.uuid4().hex}"
            return await publish_lines(
                context, subject, lines, prefix=prefix, retry_after=config.retry_after
            )
        context.stats.received += 1
        item = single_item(body, content_type, kind, request.headers, events=config.cloudevents)
        return await self._publish(context, subject, item, key)

    async def _admit(self, request: Request) -> Identity | None:
        if self.auth is None:
            return None
        try:
            return await self.auth.authenticate(request.headers)
        except AuthFailure as failure:
            headers = {"WWW-Authenticate": self.auth.challenge}
            if failure.status == 503:
                headers = {"Retry-After": str(self.config.retry_after)}
            title = "Unauthorized" if failure.status == 401 else "Service Unavailable"
            raise Problem(
                failure.status,
                failure.reason.replace("_", "-"),
                title,
                failure.detail,
                field="header.Authorization",
                headers=headers,
            ) from None

    def _limit(self, identity: Identity | None, request: Request) -> None:
        if self.limiter is None:
            return
        if identity is not None:
            client = identity.client
        else:
            client = f"ip:{request.client.host if request.client else 'unknown'}"
        wait = self.limiter.take(client)
        if wait > 0:
            raise Problem(
                429,
                "rate-limited",
                "Too Many Requests",
                f"client {client} is over {self.limiter.rate:g} requests/s "
                f"(burst {self.limiter.burst:g}); retry after the Retry-After delay",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )

    def _subject(self, request: Request) -> str:
        if not self._parameters:
            return self.subject.literals[0]
        try:
            return self.subject.render(request.path_params)
        except UnsafeToken as exc:
            raise Problem(
                400,
                "invalid-path-parameter",
                "Invalid Path Parameter",
                str(exc),
                field=f"path.{exc.name}",
            ) from None

    async def _publish(
        self, context: SourceContext, subject: str, item: Item, key: str | None
    ) -> Response:
        stats = context.stats
        if key is not None:
            message_id = f"{context.name}:{key}"
        elif item.natural_id is not None:
            message_id = f"{context.name}:{item.natural_id}"
        else:
            message_id = f"{context.name}:{uuid.uuid4().hex}"
        if self.config.reply_timeout is not None:
            return await self._request(context, subject, item, message_id)
        headers = {**item.headers, "Nats-Msg-Id": message_id}
        try:
            ack = await context.publisher.publish(subject, item.data, headers=headers)
        except PublishError as exc:
            context.logger.warning("503 for %s: %s", self.config.path, exc)
            stats.count_error("publish")
            return Problem(
                503,
                "unavailable",
                "Service Unavailable",
                f"the message was not stored, retry later: {exc}",
                headers={"Retry-After": str(self.config.retry_after)},
            ).response()
        stats.published += 1
        answer = {
            "id": message_id,
            "stream": ack.stream,
            "seq": ack.sequence,
            "duplicate": ack.duplicate,
        }
        return Response(orjson.dumps(answer), status_code=202, media_type="application/json")

    async def _request(
        self, context: SourceContext, subject: str, item: Item, message_id: str
    ) -> Response:
        """Request-reply: store the request, wait for the route's answer, return it.

        The reply's `Busway-Http-Status` header (set with a `set_headers` stage) picks the
        status, 200 by default; its `Content-Type` is kept.
        """
        timeout = float(self.config.reply_timeout or 0)
        try:
            reply = await context.request(
                subject, item.data, message_id=message_id, timeout=timeout, headers=item.headers
            )
        except PublishError as exc:
            context.stats.count_error("publish")
            return Problem(
                503,
                "unavailable",
                "Service Unavailable",
                f"the request was not stored, retry later: {exc}",
                headers={"Retry-After": str(self.config.retry_after)},
            ).response()
        except TimeoutError:
            context.stats.count_error("reply_timeout")
            return Problem(
                504,
                "no-reply",
                "Gateway Timeout",
                f"the request {message_id} was stored but no reply came within {timeout:g}s; "
                "it is still processed (retrying with the same Idempotency-Key will not "
                "process it twice)",
            ).response()
        context.stats.published += 1
        status = reply.headers.get("Busway-Http-Status", "200")
        return Response(
            reply.data,
            status_code=int(status) if status.isdigit() else 200,
            media_type=reply.headers.get("Content-Type", "application/json"),
        )

    async def _read_body(self, request: Request) -> bytes:
        """The body; Problem 413 as soon as it exceeds `max_body` (never buffering more)."""
        limit = self.config.max_body
        too_large = Problem(
            413,
            "payload-too-large",
            "Payload Too Large",
            f"the body exceeds this endpoint's max_body of {limit} bytes",
            field="body",
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise too_large
        chunks = bytearray()
        try:
            async for chunk in request.stream():
                chunks += chunk
                if len(chunks) > limit:
                    raise too_large
        except ClientDisconnect:
            # Nothing was published; the client is gone and will not read this answer.
            raise Problem(
                400, "client-disconnected", "Client Disconnected", "the body was cut short"
            ) from None
        return bytes(chunks)


def _idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is not None and not (
        0 < len(key) <= _MAX_KEY_LENGTH and key.isascii() and key.isprintable()
    ):
        raise Problem(
            400,
            "invalid-idempotency-key",
            "Invalid Idempotency-Key",
            f"Idempotency-Key must be 1-{_MAX_KEY_LENGTH} printable ASCII characters",
            field="header.Idempotency-Key",
        )
    return key
