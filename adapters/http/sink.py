"""The `http` sink: deliver each message (or a batch of them) to a URL, acked on 2xx.

    [[sinks]]
    name = "crm"
    type = "http"
    from = "orders.big"
    url = "https://crm.example/api/customers/{body.customer.id}/orders"
    method = "POST"
    headers = { Authorization = "Bearer ${CRM_TOKEN}", X-Region = "{subject[1]}" }
    concurrency = 16
    signing_secret = "${file:/run/secrets/crm-webhook}"

The messages of a batch are delivered concurrently, at most `concurrency` requests at a time
over a pool of as many keep-alive connections; `write` returns when every request has its
answer, raising `BatchError` with each failed message's error (see `classify.py`): transient
failures are naked with back-off (honouring `Retry-After`), permanent ones dead-lettered with
the status and the first 512 bytes of the answer in `Busway-Error`. A receiver can
deduplicate on `Idempotency-Key` (and `webhook-id`), which is the message id on every retry.

With `batch = "json-array"` or `"ndjson"`, the messages of a batch that share method, URL and
headers go in one request of at most `batch_max` messages, whose outcome is theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import groupby
from typing import Literal

import anyio
import msgspec

from busway import (
    BatchError,
    BuildContext,
    DeliveryError,
    Duration,
    Message,
    RetryableError,
    Sink,
    SinkConfig,
)
from busway.adapters.http.classify import error_for
from busway.adapters.http.client import HttpClient, Timeouts
from busway.adapters.http.requests import Prepared, Request, RequestBuilder

__all__ = ["HttpSink", "HttpSinkConfig", "TimeoutsConfig"]


class TimeoutsConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Seconds to connect, between reads of the answer, and for a whole request."""

    connect: Duration = Duration(5.0)
    """Longest wait to open a connection (TCP and TLS); a timeout is retried with back-off."""
    read: Duration = Duration(30.0)
    """Longest silence between two reads of the answer; raise it for a partner that thinks
    long before it answers."""
    total: Duration = Duration(60.0)
    """Longest a whole request may take, connection and answer included."""


class HttpSinkConfig(SinkConfig, tag="http", frozen=True, kw_only=True):
    """Deliver messages over HTTP."""

    url: str
    """URL template (`https://crm.example/orders/{body.id}?region={subject[1]}`); scheme and
    host must be literal, so a message cannot choose the server. Values are percent-encoded."""
    method: Literal["POST", "PUT", "PATCH"] = "POST"
    """HTTP method of every request."""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Header templates (`{ Authorization = "Bearer ${TOKEN}", X-Trace = "{header.X-Trace}" }`);
    `Idempotency-Key` and `webhook-*` are set by the sink and cannot be given."""
    body: Literal["json", "raw"] = "json"
    """`json`: the body must be JSON (otherwise dead-lettered), sent as `application/json`;
    `raw`: the bytes as they are, with the message's `Content-Type`."""
    concurrency: int = 16
    """Requests in flight at once for this sink, and the size of its keep-alive pool."""
    timeout: TimeoutsConfig = TimeoutsConfig()
    """Per-request time limits: `{ connect = "5s", read = "30s", total = "60s" }`."""
    signing_secret: str | None = None
    """`whsec_<base64>` secret: adds Standard Webhooks `webhook-id`, `webhook-timestamp` and
    `webhook-signature` headers; keep it in `${file:...}` or `${ENV}`."""
    cloudevents: Literal["binary", "structured"] | None = None
    """Send CloudEvents: `binary` (`ce-*` headers) or `structured`
    (`application/cloudevents+json`); a plain message gets `id` = message id, `type` =
    subject. Default: plain requests."""
    event_source: str | None = None
    """CloudEvents `source` attribute of the events sent (default `urn:busway:sink:<name>`)."""
    batch: Literal["json-array", "ndjson"] | None = None
    """Join the messages of a batch that share method, URL and headers into one request, as a
    JSON array or NDJSON; default: one request per message."""
    batch_max: int = 100
    """Most messages joined into one request with `batch`."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        if self.batch is not None:
            if self.cloudevents == "binary":
                raise ValueError(
                    'cloudevents = "binary" puts one event in the headers: it cannot be '
                    'batched; use cloudevents = "structured" or no batch'
                )
            if self.body != "json" and self.cloudevents is None:
                raise ValueError('batch needs body = "json": raw bodies cannot be joined')
        reserved = {"idempotency-key", "webhook-id", "webhook-timestamp", "webhook-signature"}
        for name in self.headers:
            if name.lower() in reserved:
                raise ValueError(f"headers: {name!r} is set by the sink itself")
        RequestBuilder(  # compiles the templates: a bad one is a config error with its path
            method=self.method,
            url=self.url,
            headers=self.headers,
            body=self.body,
            cloudevents_mode=self.cloudevents,
            event_source=self.event_source or "",
            signing_secret=self.signing_secret,
        )


class HttpSink(Sink):
    """Delivers batches concurrently; see the module docstring for the outcome of each status."""

    def __init__(self, config: HttpSinkConfig, context: BuildContext | None = None) -> None:
        self.config = config
        self.requests = RequestBuilder(
            method=config.method,
            url=config.url,
            headers=config.headers,
            body=config.body,
            cloudevents_mode=config.cloudevents,
            event_source=config.event_source or f"urn:busway:sink:{config.name}",
            signing_secret=config.signing_secret,
        )
        timeouts = config.timeout
        self.client = HttpClient(
            connections=config.concurrency,
            timeouts=Timeouts(
                connect=float(timeouts.connect),
                read=float(timeouts.read),
                total=float(timeouts.total),
            ),
        )
        self._limiter: anyio.CapacityLimiter | None = None
        self._healthy = True

    async def open(self) -> None:
        """Create the connection pool (connections are opened on first use)."""
        await self.client.open()
        self._limiter = anyio.CapacityLimiter(self.config.concurrency)

    async def close(self) -> None:
        """Close the pool."""
        await self.client.close()

    def ready(self) -> bool:
        """False after a transient failure (peer down, 5xx), until a delivery succeeds."""
        return self._healthy

    async def write(self, batch: Sequence[Message]) -> None:
        """Deliver `batch`; BatchError with the failed messages' errors, by index."""
        failures: dict[int, DeliveryError] = {}
        units: list[tuple[list[int], Request]] = []
        prepared: list[tuple[int, Prepared]] = []
        for index, message in enumerate(batch):
            try:
                prepared.append((index, self.requests.prepare(message)))
            except DeliveryError as exc:
                failures[index] = exc
        if self.config.batch is None:
            units = [([index], self.requests.single(p)) for index, p in prepared]
        else:
            units = self._batched(prepared, self.config.batch)
        async with anyio.create_task_group() as tg:
            for indices, request in units:
                tg.start_soon(self._deliver, indices, request, failures)
        if failures:
            raise BatchError(failures)

    def _batched(
        self, prepared: list[tuple[int, Prepared]], mode: str
    ) -> list[tuple[list[int], Request]]:
        """Requests of up to `batch_max` messages that share method, URL and headers."""
        units: list[tuple[list[int], Request]] = []

        def target(item: tuple[int, Prepared]) -> tuple[str, str, tuple[tuple[str, str], ...]]:
            return (item[1].method, item[1].url, item[1].headers)

        for _, group in groupby(sorted(prepared, key=target), key=target):
            members = list(group)
            for start in range(0, len(members), self.config.batch_max):
                chunk = members[start : start + self.config.batch_max]
                request = self.requests.batch([p for _, p in chunk], mode)
                units.append(([index for index, _ in chunk], request))
        return units

    async def _deliver(
        self, indices: list[int], request: Request, failures: dict[int, DeliveryError]
    ) -> None:
        assert self._limiter is not None, "HttpSink.write called before open()"
        async with self._limiter:
            try:
                reply = await self.client.send(
                    request.method, request.url, headers=request.headers, body=request.body
                )
            except DeliveryError as exc:
                error: DeliveryError | None = exc
            else:
                error = error_for(reply, request.method, request.url)
        if error is None:
            self._healthy = True
            return
        if isinstance(error, RetryableError):
            self._healthy = False
        for index in indices:
            failures[index] = error
