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
* 400 bad JSON, an integer beyond 64 bits, bad CloudEvent, bad `Idempotency-Key`, or a path
  parameter that cannot be a subject token; 413 over `max_body`; 415 a media type this source
  does not take;
* 422 an `Idempotency-Key` already used for a different request; 409 (request-reply) the
  request with that key is still being processed;
* 503 with `Retry-After` when JetStream did not confirm: `unavailable` (nothing stored) or
  `not-confirmed` (sent, PubAck missing: it may be stored; retry with the same key).

An `Idempotency-Key` header becomes the `Nats-Msg-Id`, scoped by the authenticated client
(`<source>:<principal>:<key>`, suffixed with `:<line>` for NDJSON), so a client retrying after
a lost answer does not create a second message within the stream's duplicate window, and two
clients never collide (see `idempotency.py`). A CloudEvent without one is identified by its
`source` and `id`, also per client.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path
from typing import Literal

import anyio
import msgspec
import orjson
from anyio.abc import TaskGroup, TaskStatus
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from busway import (
    BuildContext,
    Duration,
    PublishError,
    Reply,
    Source,
    SourceConfig,
    SourceContext,
)
from busway.adapters.http.auth import AuthConfig, Authenticator, AuthFailure, Identity
from busway.adapters.http.bodies import Item, Kind, kind_of, ndjson_items, single_item
from busway.adapters.http.carried import HeaderAllowList, check_allowed, principal
from busway.adapters.http.idempotency import (
    Ledger,
    Record,
    State,
    fingerprint,
    key_id,
    replay,
    scope,
)
from busway.adapters.http.ndjson import publish_lines
from busway.adapters.http.paths import SubjectTemplate, UnsafeToken, path_parameters
from busway.adapters.http.problems import Problem, publish_failed
from busway.adapters.http.ratelimit import RateLimitConfig, RateLimiter

__all__ = ["HttpSource", "HttpSourceConfig"]

_MAX_KEY_LENGTH = 200
# Request-reply with keys: at most this many requests wait at once for an answer to record;
# beyond, a request waits only `reply_timeout`, and after its 504 retries start it afresh.
_MAX_WAITING = 10_000
_METHODS = frozenset({"POST", "PUT", "PATCH"})
# Metric reasons (busway_errors_total) of the problems whose slug reads differently.
_REASONS = {
    "payload-too-large": "too_large",
    "too-many-lines": "too_large",
    "invalid-json": "bad_json",
    "invalid-idempotency-key": "bad_idempotency_key",
    "idempotency-key-reused": "idempotency_key_reused",
    "request-in-progress": "idempotency_key_in_progress",
    "rate-limited": "rate_limited",
}


class HttpSourceConfig(SourceConfig, tag="http", frozen=True, kw_only=True):
    """An ingest endpoint on the shared listener."""

    path: str
    """URL path on the shared listener, a Starlette template (`/orders/{region}`); each
    `{param}` may fill a whole token of `subject`."""
    methods: list[str] = msgspec.field(default_factory=lambda: ["POST"])
    """Accepted methods, any of POST, PUT and PATCH; others get 405."""
    content: Literal["json", "bytes"] = "json"
    """`json`: JSON bodies, NDJSON and structured CloudEvents; `bytes`: any body, stored as
    is, with its `Content-Type` kept in a header."""
    ndjson: bool = True
    """Accept `application/x-ndjson` (or `application/jsonl`): one message per line."""
    max_lines: int = 10_000
    """Most lines of one NDJSON request."""
    cloudevents: bool = True
    """Accept CloudEvents in binary (`ce-*` headers) and structured
    (`application/cloudevents+json`) mode."""
    max_body: int = 1024 * 1024
    """Largest request body in bytes; larger ones get 413."""
    retry_after: int = 1
    """Seconds a 503 answer's `Retry-After` asks the client to wait."""
    auth: AuthConfig | None = None
    """Require credentials: API keys, JWT, or both (either admits); default: none."""
    rate_limit: RateLimitConfig | None = None
    """A token bucket per client (API key, JWT subject, else IP); excess gets 429."""
    reply_timeout: Duration | None = None
    """Request-reply mode: wait this long for a route's `reply` stage and answer with it."""
    headers: list[str] = msgspec.field(default_factory=list)
    """Request headers the message keeps (case-insensitive: `["X-Tier", "traceparent"]`);
    hop-by-hop headers, credentials and `Busway-*` / `Nats-*` cannot be listed. The
    authenticated principal is always stamped as `Busway-Principal`."""

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
        check_allowed(self.headers, self.auth.api_key_header if self.auth else None)


class HttpSource(Source):
    """Publishes each accepted request body to `subject`, answering after the PubAck."""

    def __init__(self, config: HttpSourceConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.subject = SubjectTemplate.compile(config.subject, config.path)
        self._parameters = path_parameters(config.path)
        build = context or BuildContext(base_dir=Path.cwd())
        self.auth = Authenticator(config.auth, build) if config.auth is not None else None
        self.limiter = RateLimiter(config.rate_limit) if config.rate_limit is not None else None
        self.allowed = HeaderAllowList(config.headers)
        self._context: SourceContext | None = None
        self._ledger: Ledger | None = None
        self._tasks: TaskGroup | None = None
        self._waiting = 0

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Mount the endpoint on the shared listener and serve until cancelled."""
        self._context = context
        self._ledger = Ledger(
            await context.dedup_store(), context.logger, retry_after=self.config.retry_after
        )
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
        async with anyio.create_task_group() as self._tasks:
            task_status.started()
            await anyio.sleep_forever()

    async def ingest(self, request: Request) -> Response:
        """Check, publish, and answer only once JetStream confirmed what was accepted."""
        context = self._context
        assert context is not None, "HttpSource.ingest called before run()"
        try:
            return await self._ingest(request, context)
        except Problem as answer:
            context.stats.count_error(
                answer.reason or _REASONS.get(answer.slug, answer.slug.replace("-", "_"))
            )
            return answer.response()

    async def _ingest(self, request: Request, context: SourceContext) -> Response:
        config = self.config
        context.note_client(request.client.host if request.client else None)  # [audit]
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
        client = scope(context.name, identity)
        claim = (
            None if key is None else _Claim(key, key_id(client, key), fingerprint(request, body))
        )
        carried = self.allowed.pick(request.headers)
        stamped = principal(identity)
        if kind == Kind.NDJSON:
            return await self._ingest_lines(context, subject, body, claim, carried, stamped)
        context.stats.received += 1
        item = single_item(body, content_type, kind, request.headers, events=config.cloudevents)
        item.headers = {**carried, **item.headers, **stamped}
        if claim is not None:
            message_id = claim.message_id
        elif item.natural_id is not None:
            message_id = f"{client}:{item.natural_id}"
        else:
            message_id = f"{context.name}:{uuid.uuid4().hex}"
        if config.reply_timeout is not None:
            if claim is not None:
                return await self._request_once(context, subject, item, claim)
            return await self._request(context, subject, item, message_id)
        owned = claim is not None and await self._claim(claim, "accepted") is None
        return await self._publish(
            context,
            subject,
            item,
            message_id,
            keyed=claim is not None,
            owned=claim if owned else None,
        )

    async def _ingest_lines(
        self,
        context: SourceContext,
        subject: str,
        body: bytes,
        claim: _Claim | None,
        carried: dict[str, str],
        stamped: dict[str, str],
    ) -> Response:
        """NDJSON: every line a message, one answer listing each line's fate."""
        lines = ndjson_items(body, self.config.max_lines)
        if carried or stamped:
            for _, line in lines:
                if isinstance(line, Item):
                    line.headers = {**carried, **line.headers, **stamped}
        context.stats.received += len(lines)
        owned = claim is not None and await self._claim(claim, "accepted") is None
        published = await publish_lines(
            context,
            subject,
            lines,
            prefix=claim.message_id if claim else f"{context.name}:{uuid.uuid4().hex}",
            retry_after=self.config.retry_after,
            keyed=claim is not None,
        )
        if owned and claim is not None and not published.anything_stored:
            await self._release(claim)  # nothing stored: a corrected retry is welcome
        return published.response

    async def _claim(self, claim: _Claim, state: State) -> Record | None:
        """Record the key for this request (None), or the same request's record; 422/503."""
        assert self._ledger is not None
        record = Record(claim.fingerprint, state)
        return await self._ledger.claim(claim.message_id, claim.key, record)

    async def _release(self, claim: _Claim) -> None:
        assert self._ledger is not None
        await self._ledger.release(claim.message_id)

    async def _admit(self, request: Request) -> Identity | None:
        """The caller's identity; Problem 401 or 503 that says nothing of what failed.

        Which check failed (unknown key, expired token, bad signature, the JWKS URL that
        cannot be reached) goes to the log and the metric label, never to the caller.
        """
        if self.auth is None:
            return None
        try:
            return await self.auth.authenticate(request.headers)
        except AuthFailure as failure:
            assert self._context is not None
            client = request.client.host if request.client else "unknown"
            self._context.logger.info(
                "%d for %s from %s: %s", failure.status, self.config.path, client, failure.detail
            )
            if failure.status == 503:
                raise Problem(
                    503,
                    "unavailable",
                    "Service Unavailable",
                    "credentials cannot be checked now; retry after the Retry-After delay",
                    headers={"Retry-After": str(self.config.retry_after)},
                    reason=failure.reason,
                ) from None
            raise Problem(
                401,
                "unauthorized",
                "Unauthorized",
                f"the request carries no valid credentials: send {self.auth.expected}",
                headers={"WWW-Authenticate": self.auth.challenge},
                reason=failure.reason,
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
        self,
        context: SourceContext,
        subject: str,
        item: Item,
        message_id: str,
        *,
        keyed: bool,
        owned: _Claim | None,
    ) -> Response:
        """Publish one message; `owned` is the key this request recorded (None: no key, or
        an earlier attempt recorded it), released if nothing was stored."""
        stats = context.stats
        headers = {**item.headers, "Nats-Msg-Id": message_id}
        try:
            ack = await context.publisher.publish(subject, item.data, headers=headers)
        except PublishError as exc:
            if owned is not None and not exc.unconfirmed:
                await self._release(owned)  # nothing stored: a corrected retry is welcome
            return self._failed(context, exc, keyed, "message")
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
            return self._failed(context, exc, False, "request")
        except TimeoutError:
            context.stats.count_error("reply_timeout")
            return Problem(
                504,
                "no-reply",
                "Gateway Timeout",
                f"the request {message_id} was stored but no reply came within {timeout:g}s; "
                "it is still processed. Send an Idempotency-Key to be able to retry a request "
                "and get its answer",
            ).response()
        context.stats.published += 1
        return _answer(reply)

    async def _request_once(
        self, context: SourceContext, subject: str, item: Item, claim: _Claim
    ) -> Response:
        """Request-reply with an Idempotency-Key: one request per key, its answer recorded.

        The request is sent from a task of the source, which waits for the answer up to the
        key's lifetime (the duplicate window) and records it, even after this HTTP request
        got its 504: the client's retry then gets the answer, or 409 while there is none yet.
        """
        assert self._ledger is not None
        assert self._tasks is not None
        before = await self._claim(claim, "processing")
        if before is not None:
            if before.state == "answered":
                return replay(before)
            raise self._ledger.in_progress()
        timeout = float(self.config.reply_timeout or 0)
        outcome = _Outcome()
        keep = max(timeout, self._ledger.store.ttl)
        if self._waiting >= _MAX_WAITING:
            keep = timeout
        self._tasks.start_soon(self._await_reply, context, subject, item, claim, keep, outcome)
        with anyio.move_on_after(timeout):
            await outcome.done.wait()
        if isinstance(outcome.value, Reply):
            return _answer(outcome.value)
        if isinstance(outcome.value, PublishError):
            return self._failed(context, outcome.value, True, "request")
        context.stats.count_error("reply_timeout")
        return Problem(
            504,
            "no-reply",
            "Gateway Timeout",
            f"no reply to the request {claim.message_id} within {timeout:g}s; it is still "
            "processed: retry with the same Idempotency-Key to get its answer (409 while "
            "there is none yet)",
        ).response()

    async def _await_reply(
        self,
        context: SourceContext,
        subject: str,
        item: Item,
        claim: _Claim,
        keep: float,
        outcome: _Outcome,
    ) -> None:
        """Send the request, wait up to `keep` for its answer, record it for retries."""
        assert self._ledger is not None
        self._waiting += 1
        try:
            try:
                reply = await context.request(
                    subject,
                    item.data,
                    message_id=claim.message_id,
                    timeout=keep,
                    headers=item.headers,
                )
            except PublishError as exc:
                outcome.value = exc
                await self._release(claim)  # stored or not, a retry must not meet 409s
                return
            except TimeoutError:
                await self._release(claim)
                return
            context.stats.published += 1
            outcome.value = reply
            answer = _answer(reply)
            record = Record(
                claim.fingerprint,
                "answered",
                status=answer.status_code,
                content_type=answer.media_type or "application/json",
                body=reply.data,
            )
            await self._ledger.put(claim.message_id, record)
        finally:
            self._waiting -= 1
            outcome.done.set()

    def _failed(
        self, context: SourceContext, exc: PublishError, keyed: bool, what: str
    ) -> Response:
        """503, saying whether the message may be stored; the reason goes to the log only."""
        context.logger.warning("503 for %s: %s", self.config.path, exc)
        context.stats.count_error("publish_unconfirmed" if exc.unconfirmed else "publish")
        return publish_failed(
            unconfirmed=exc.unconfirmed,
            keyed=keyed,
            what=what,
            retry_after=self.config.retry_after,
        ).response()

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


class _Claim:
    """An `Idempotency-Key`, the message id it makes, and the request's fingerprint."""

    __slots__ = ("fingerprint", "key", "message_id")

    def __init__(self, key: str, message_id: str, fingerprint: str) -> None:
        self.key = key
        self.message_id = message_id
        self.fingerprint = fingerprint


class _Outcome:
    """What the request task learned while the HTTP request waited: the answer or an error."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Reply | PublishError | None = None


def _answer(reply: Reply) -> Response:
    """The HTTP response of a route's reply: status from `Busway-Http-Status` (default 200)."""
    status = reply.headers.get("Busway-Http-Status", "200")
    return Response(
        reply.data,
        status_code=int(status) if status.isdigit() else 200,
        media_type=reply.headers.get("Content-Type", "application/json"),
    )


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
