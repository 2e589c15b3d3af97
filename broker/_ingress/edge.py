"""The listener's connection limits: header size, count and time, body rate, connections.

uvicorn with httptools enforces only the keep-alive idle timeout (`timeout_keep_alive`, which
starts after a first response, so a connection that never sends is not covered) and a
concurrency cap (`limit_concurrency`) that still accepts every connection and answers 503 only
once a request's headers are complete; `h11_max_incomplete_event_size` bounds headers for the
h11 parser only. It has no limit on header size (httptools
even grows a header value by concatenation, so a 48 MB header costs quadratic copying), no
header read timeout (a client that never finishes its headers holds its connection for ever:
slowloris) and no body timeout. `EdgeProtocol` adds them to uvicorn's own httptools protocol,
on the event loop's timers, without touching the ASGI app:

* header bytes are counted as they arrive, before httptools buffers them; past
  `max_header_bytes` (or `max_headers` fields) the client gets 431 and the connection closes;
* one timer per connection covers the header phase, from the connection (or from the first
  byte of a later request on a keep-alive connection) to the end of the headers: 408;
* one timer covers the body: it must be complete within `body_timeout` plus one second per
  `body_min_rate` bytes received (Apache's mod_reqtimeout rule), else 408; time during which
  the server itself paused reading (the app is slow to consume) is not held against it;
* past `max_connections` open connections a new one is answered 503 and closed at once, so a
  flood costs one descriptor for microseconds, never the process's last one.

Refusals are counted in `EdgeStats` (exported as `busway_http_refused_total{reason}`).
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from busway._errors import StartupError

__all__ = ["EdgeLimits", "EdgeProtocol", "EdgeStats", "canned", "connection_budget"]

logger = logging.getLogger("busway.http")

DEFAULT_MAX_CONNECTIONS = 1024
# Descriptors kept for everything that is not an HTTP connection: NATS, files, databases.
RESERVED_DESCRIPTORS = 256
# Phases of a request, for the connection's one timer.
_IDLE, _HEADERS, _BODY = 0, 1, 2
# A refused connection keeps reading (and dropping) input after its answer for this many
# seconds, or until it dropped this many bytes.
_LINGER = 2.0
_LINGER_BYTES = 256 * 1024


class EdgeStats(Collector):
    """Refusals by reason and open connections, for `/metrics`."""

    def __init__(self) -> None:
        self.refused: Counter[str] = Counter()
        self.open_connections: list[set[Any]] = []

    def count(self, reason: str) -> None:
        """Count one refusal of kind `reason`."""
        self.refused[reason] += 1

    def collect(self) -> Iterator[Metric]:
        """`busway_http_refused_total{reason}` and `busway_http_connections`."""
        refused = CounterMetricFamily(
            "busway_http_refused",
            "Requests or connections the HTTP listeners refused before any source saw them",
            labels=["reason"],
        )
        for reason, count in sorted(self.refused.items()):
            refused.add_metric([reason], count)
        yield refused
        yield GaugeMetricFamily(
            "busway_http_connections",
            "Open connections on the HTTP listeners",
            value=sum(len(c) for c in self.open_connections),
        )


@dataclass(frozen=True, slots=True)
class EdgeLimits:
    """The limits of one listener, in seconds and bytes (see `HttpConfig`)."""

    max_header_bytes: int = 32 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 10.0
    body_min_rate: float = 1024.0
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    stats: EdgeStats = field(default_factory=EdgeStats)


def connection_budget(requested: int | None, listeners: int = 1) -> int:
    """The connection limit per listener that fits the process's open-file limit.

    The soft limit is raised to the hard one when it is too low (as Go programs do at start),
    since the soft default of many systems (1,024) is lower than the hard one. A `requested`
    limit that still does not fit is a StartupError; the default is lowered to fit, with a log.
    """
    wanted = requested if requested is not None else DEFAULT_MAX_CONNECTIONS
    needed = wanted * listeners + RESERVED_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the open-file limit to %d: %s", target, exc)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return wanted
    fits = (soft - RESERVED_DESCRIPTORS) // listeners
    if requested is not None or fits < 1:
        raise StartupError(
            f"[http] max_connections = {wanted} does not fit the open-file limit of {soft} "
            f"(each connection holds a descriptor, and {RESERVED_DESCRIPTORS} are kept for "
            f"the rest): lower it to at most {max(fits, 0)}, or raise the limit "
            "(`ulimit -n`, systemd LimitNOFILE)"
        )
    logger.warning(
        "[http] max_connections lowered to %d to fit the open-file limit of %d", fits, soft
    )
    return fits


def canned(status: int, slug: str, title: str, detail: str, extra: bytes = b"") -> bytes:
    """A complete `application/problem+json` response that closes the connection."""
    body = orjson.dumps(
        {"type": f"urn:busway:problem:{slug}", "title": title, "status": status, "detail": detail}
    )
    return b"".join(
        (
            f"HTTP/1.1 {status} {title}\r\n".encode(),
            b"content-type: application/problem+json\r\n",
            f"content-length: {len(body)}\r\n".encode(),
            extra,
            b"connection: close\r\n\r\n",
            body,
        )
    )


_TOO_MANY_CONNECTIONS = canned(
    503,
    "overloaded",
    "Service Unavailable",
    "the server has too many open connections; retry after the Retry-After delay",
    b"retry-after: 1\r\n",
)
_HEADER_TIMEOUT = canned(
    408, "request-timeout", "Request Timeout", "the request's headers did not arrive in time"
)
_BODY_TIMEOUT = canned(
    408, "request-timeout", "Request Timeout", "the request's body arrived too slowly"
)


class _Refused(Exception):
    """Raised from a parser callback to stop parsing a request that broke a limit.

    httptools wraps it in an HttpParserCallbackError, which uvicorn answers with a 400:
    `send_400_response` stays silent when `_refusal` says it was ours.
    """


class EdgeProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits of `limits` (set by `with_limits`)."""

    limits: ClassVar[EdgeLimits] = EdgeLimits()

    @classmethod
    def with_limits(cls, limits: EdgeLimits) -> type[EdgeProtocol]:
        """A protocol class for uvicorn's `http` setting, bound to `limits`."""
        return type("EdgeProtocol", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turned_away = False
        # One timer per connection, re-armed lazily: a phase change only moves `_deadline`,
        # and the timer, when it fires, re-arms itself for the current phase's deadline. A
        # busy keep-alive connection thus schedules nothing per request.
        self._timer: asyncio.TimerHandle | None = None
        self._phase = _IDLE
        self._deadline = 0.0
        self._pending = 0  # raw bytes received since the headers began
        self._header_bytes = 0  # request line and headers, as parsed
        self._header_count = 0
        self._refusal: tuple[bytes, str] | None = None
        self._body_bytes = 0
        self._lingering = False

    # -- connections -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Turn the connection away with 503 past `max_connections`; else time its headers."""
        if len(self.connections) >= self.limits.max_connections:
            self._turned_away = True
            self.transport = transport
            self.limits.stats.count("too_many_connections")
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        super().connection_made(transport)
        self._begin_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the timers; a turned-away connection was never uvicorn's."""
        self._cancel_timer()
        if self._turned_away:
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count header bytes before httptools buffers them; refuse what breaks a limit."""
        if self._turned_away:
            return
        if self._lingering:  # a refused request's remaining bytes are read and dropped
            self._pending += len(data)
            if self._pending > _LINGER_BYTES:
                self.transport.close()  # it keeps sending at full speed: stop listening
            return
        if self._phase == _HEADERS:
            self._pending += len(data)
        super().data_received(data)
        if self._refusal is not None:
            self._refuse(*self._refusal)
        elif self._phase == _HEADERS and self._pending > self.limits.max_header_bytes:
            self._refuse_headers()

    def send_400_response(self, msg: str) -> None:
        """A parser error caused by our own callback is our refusal, not a bad request."""
        if self._refusal is None:
            super().send_400_response(msg)

    # -- the header phase --------------------------------------------------------------------

    def _begin_headers(self) -> None:
        self._phase = _HEADERS
        self._pending = 0
        self._header_bytes = 0
        self._header_count = 0
        self._deadline = self.loop.time() + self.limits.header_timeout
        self._watch(self._deadline)

    def on_message_begin(self) -> None:
        """A later request on a keep-alive connection: its headers' time starts now."""
        super().on_message_begin()
        if self._phase != _HEADERS:
            self._begin_headers()

    def on_url(self, url: bytes) -> None:
        """Count the request line against `max_header_bytes`."""
        self._header_bytes += len(url)
        if self._header_bytes > self.limits.max_header_bytes:
            self._stop_parsing_headers()
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count one field against `max_headers` and `max_header_bytes`."""
        self._header_count += 1
        self._header_bytes += len(name) + len(value) + 4
        limits = self.limits
        if self._header_count > limits.max_headers or self._header_bytes > limits.max_header_bytes:
            self._stop_parsing_headers()
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """Headers done in time: from now on the body's clock runs."""
        self._phase = _BODY
        super().on_headers_complete()
        self._deadline = self.loop.time()  # the body's clock starts
        self._body_bytes = 0
        self._watch(self._deadline + self.limits.body_timeout)

    def _stop_parsing_headers(self) -> None:
        self._refusal = self._headers_refusal()
        raise _Refused

    def _headers_refusal(self) -> tuple[bytes, str]:
        limits = self.limits
        too_many = self._header_count > limits.max_headers
        reason = "too_many_headers" if too_many else "headers_too_large"
        response = canned(
            431,
            "headers-too-large",
            "Request Header Fields Too Large",
            f"the request's headers exceed this server's limits of {limits.max_header_bytes} "
            f"bytes and {limits.max_headers} fields",
        )
        return response, reason

    def _refuse_headers(self) -> None:
        self._refuse(*self._headers_refusal())

    # -- the body ----------------------------------------------------------------------------

    def on_body(self, body: bytes) -> None:
        """Count the body's bytes for its minimum rate."""
        self._body_bytes += len(body)
        super().on_body(body)

    def on_message_complete(self) -> None:
        """The whole body arrived: stop its clock."""
        if self._phase == _BODY:
            self._phase = _IDLE
        super().on_message_complete()

    # -- the timer ---------------------------------------------------------------------------

    def _watch(self, when: float) -> None:
        """Make sure the timer fires by `when` (a pending timer re-arms itself if later)."""
        if self._timer is None:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        """Refuse a request whose phase is over time; else wait for its current deadline."""
        self._timer = None
        now = self.loop.time()
        if self._phase == _HEADERS:
            if now >= self._deadline:
                self._refuse(_HEADER_TIMEOUT, "header_timeout")
            else:
                self._watch(self._deadline)
        elif self._phase == _BODY:
            limits = self.limits
            if self.flow.read_paused:
                # We stopped reading (the app has not consumed what it got): not the
                # client's fault, so its clock starts again when we read again.
                self._deadline, self._body_bytes = now, 0
            allowed = limits.body_timeout + self._body_bytes / limits.body_min_rate
            deadline = self._deadline + allowed
            if now >= deadline:
                self._refuse(_BODY_TIMEOUT, "body_timeout")
            else:
                self._watch(deadline)

    # -- refusing ----------------------------------------------------------------------------

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _refuse(self, response: bytes, reason: str) -> None:
        """Answer `response` unless a response already started, and close the connection."""
        self._cancel_timer()
        self._phase = _IDLE
        if self.transport.is_closing():
            return
        self.limits.stats.count(reason)
        logger.info(
            "closing the connection of %s: %s", _peer(self.client), reason.replace("_", " ")
        )
        cycle = self.cycle
        answered = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_complete:
            # The app, if it waits for the body, now gets http.disconnect and cannot write.
            cycle.disconnected = True
            cycle.message_event.set()
        if answered:
            self.transport.close()
            return
        self.transport.write(response)
        self._linger()

    def _linger(self) -> None:
        """Half-close after the answer and drop what the client still sends, for a moment.

        Closing a socket with unread input makes the kernel send a reset, and a reset can
        discard the answer before the client reads it: the 431 or 408 would arrive as a bare
        "connection reset". So, like nginx's lingering close, the answer is followed by a FIN,
        input is read and dropped, and the connection closes when the client closes its side
        after `_LINGER` seconds or `_LINGER_BYTES` dropped, whichever is first (uvicorn's
        `eof_received` returns None, so the transport closes on the client's FIN).
        """
        self._lingering = True
        self._pending = 0
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(_LINGER, self.transport.close)


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "a client"
