"""OpenTelemetry spans per hop: ingress, route, sink write (`[tracing] enabled`).

The only module that imports OpenTelemetry, and only `Bus` imports it, only when tracing is
on (`open_spans`), so a deployment without tracing neither needs nor loads the SDK.

Spans and the carried context:

* **ingress** (every source): a PRODUCER span around the publish, child of the caller's
  `traceparent` when one came in (following the caller's sampled flag); the message is stored
  with the span's context. Whether a new trace is recorded is decided here, once, by
  `sample_ratio`; the decision travels in the `traceparent` flags, and an unsampled new trace
  gets a `traceparent` too (flags `00`, no span), so its logs still share a trace id;
* **route**: a CONSUMER span per input whose `traceparent` says sampled, covering the route's
  processing and the sending of its outputs; the input's `traceparent` is replaced by the
  span's, so every output (and a dead letter) is its child. Unsampled inputs pass untouched:
  no span, no OpenTelemetry call, the header forwarded as it came (W3C allows it). An input
  without a `traceparent` (published by something that does not trace) starts a trace here,
  with the same ratio;
* **sink write**: a CLIENT span per sampled message of a batch, around `Sink.write`; during the
  write the message's `traceparent` is the span's (the HTTP sink sends it to the partner),
  restored afterwards so a retry's span is again a child of the message's context.

Spans are exported by a `BatchSpanProcessor` (a background thread, bounded queue: a slow
collector drops spans, never holds a message) to OTLP/HTTP, or to the exporter given to
`Bus(span_exporter=...)`.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from busway._observe.tracing import (
    TRACEPARENT,
    TRACESTATE,
    is_sampled,
    looks_unsampled,
    valid_traceparent,
)

if TYPE_CHECKING:
    from busway._config.model import TracingConfig
    from busway._delivery.delivery import Delivery

__all__ = ["Spans", "open_spans"]

_Headers = MutableMapping[str, str]
_Write = tuple[int, _Headers, str, trace.Span]
"""A started write span: the message's index in its batch, its headers, its own
`traceparent` (restored after the write), the span."""


def open_spans(config: TracingConfig, exporter: Any = None) -> Spans:
    """The spans of one bus: its own provider (never the global one: an embedding
    application keeps its own), exporting to `exporter` or OTLP/HTTP."""
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint)
    assert isinstance(exporter, SpanExporter)
    # Follow the carried decision; a new trace is decided by `Spans` itself (one random()
    # per root, before any OpenTelemetry call, so an unsampled message costs nothing more).
    provider = TracerProvider(
        sampler=ParentBased(ALWAYS_ON),
        resource=Resource.create({"service.name": config.service_name}),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return Spans(provider, config.sample_ratio)


class Spans:
    """Starts and ends busway's spans; see the module docstring for which and why."""

    def __init__(self, provider: TracerProvider, ratio: float) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("busway")
        self._ratio = ratio

    def shutdown(self) -> None:
        """Export what is queued and stop (blocking: run it in a thread)."""
        self._provider.shutdown()

    # -- ingress ----------------------------------------------------------------------------

    def ingress(
        self, source: str, subject: str, headers: _Headers | None
    ) -> tuple[dict[str, str], trace.Span | None]:
        """Start the ingress span of a message `source` publishes (None: not sampled); the
        headers to store it with (the span's `traceparent`, the caller's `tracestate`)."""
        carried = dict(headers) if headers else {}
        parent = carried.get(TRACEPARENT)
        if parent is None or not valid_traceparent(parent):
            carried.pop(TRACESTATE, None)
            if random.random() >= self._ratio:
                carried[TRACEPARENT] = _unsampled()
                return carried, None
        elif not is_sampled(parent):
            return carried, None
        span = self._tracer.start_span(
            f"ingress {source}",
            context=_parent(carried),
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": subject,
                "busway.source": source,
            },
        )
        carried[TRACEPARENT] = _traceparent(span.get_span_context())
        return carried, span

    @staticmethod
    def end(span: trace.Span | None, error: BaseException | None = None) -> None:
        """End `span` (if any), marked failed with `error`'s type if given."""
        if span is None:
            return
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()

    # -- route ------------------------------------------------------------------------------

    async def route_hop(
        self, handle: Callable[[Delivery], Awaitable[None]], message: Delivery, route: str
    ) -> None:
        """Run `handle(message)` inside the route's span when the message is sampled."""
        headers = message.headers
        if headers is None:
            headers = message.headers = {}
        parent = headers.get(TRACEPARENT)
        if parent is not None and looks_unsampled(parent):
            await handle(message)  # unsampled: forwarded untouched, no span
            return
        new_trace = parent is None or not valid_traceparent(parent)
        if new_trace and random.random() >= self._ratio:
            headers[TRACEPARENT] = _unsampled()  # a new trace, not sampled: no span
            await handle(message)
            return
        span = self._tracer.start_span(
            f"route {route}",
            context=_parent(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.source.name": message.subject,
                "busway.route": route,
                "busway.stream_sequence": message.sequence,
                "busway.attempt": message.attempt,
            },
        )
        headers[TRACEPARENT] = _traceparent(span.get_span_context())
        try:
            await handle(message)
        finally:
            span.end()

    # -- sink -------------------------------------------------------------------------------

    def sink_writes(self, sink: str, batch: list[tuple[Delivery, Any, float]]) -> list[_Write]:
        """Start a write span per sampled message of `batch`; what `end_writes` needs."""
        started: list[_Write] = []
        for index, (delivery, _, _) in enumerate(batch):
            headers = delivery.headers
            if not headers:
                continue
            parent = headers.get(TRACEPARENT)
            if parent is None or looks_unsampled(parent) or not valid_traceparent(parent):
                continue  # not sampled (or not traced): no span
            span = self._tracer.start_span(
                f"sink {sink} write",
                context=_parent(headers),
                kind=SpanKind.CLIENT,
                attributes={
                    "messaging.system": "nats",
                    "busway.sink": sink,
                    "busway.stream_sequence": delivery.sequence,
                    "busway.batch_size": len(batch),
                },
            )
            headers[TRACEPARENT] = _traceparent(span.get_span_context())
            started.append((index, headers, parent, span))
        return started

    @staticmethod
    def end_writes(started: list[_Write], failures: dict[int, BaseException]) -> None:
        """End the write spans (each failed if its message's write failed); restore the
        messages' own `traceparent`."""
        for index, headers, parent, span in started:
            headers[TRACEPARENT] = parent
            failed = failures.get(index)
            if failed is not None:
                span.set_status(Status(StatusCode.ERROR, type(failed).__name__))
            span.end()


def _parent(headers: _Headers) -> Context | None:
    """The context of the message's `traceparent` (and `tracestate`), or None (a root)."""
    parent = headers.get(TRACEPARENT)
    if parent is None or not valid_traceparent(parent):
        return None
    state = headers.get(TRACESTATE)
    context = SpanContext(
        trace_id=int(parent[3:35], 16),
        span_id=int(parent[36:52], 16),
        is_remote=True,
        trace_flags=TraceFlags(int(parent[53:], 16)),
        trace_state=TraceState.from_header([state]) if state else None,
    )
    return trace.set_span_in_context(NonRecordingSpan(context))


def _unsampled() -> str:
    """A new trace's `traceparent`, not sampled (flags `00`)."""
    return f"00-{random.getrandbits(128) or 1:032x}-{random.getrandbits(64) or 1:016x}-00"


def _traceparent(context: SpanContext) -> str:
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"
