"""What an HTTP status means for a delivery: done, try again later, or never.

    2xx                       delivered: the engine acks
    408, 425, 429, 5xx        transient: RetryableError, honouring Retry-After
    other 3xx / 4xx           permanent: PermanentError naming status and a body excerpt

Redirects are not followed: a webhook endpoint that redirects a POST is misconfigured, and
following it would send signed payloads to wherever the redirect points.
"""

from __future__ import annotations

import email.utils
import time

from busway import DeliveryError, PermanentError, RetryableError
from busway.adapters.http.client import Reply, redact

__all__ = ["HttpRetryableStatus", "HttpStatusError", "error_for", "parse_retry_after"]

_TRANSIENT = frozenset({408, 425, 429})
_MAX_RETRY_AFTER = 24 * 3600.0


class HttpStatusError(PermanentError):
    """The peer refused the message for good; `status` and `excerpt` say how.

    `reason` (`http_404`) names it in metrics and dead letters, and in a sink's
    `retry.transient` / `retry.permanent` lists, which can re-classify a status.
    """

    def __init__(self, message: str, *, status: int, excerpt: str) -> None:
        super().__init__(message)
        self.status = status
        self.excerpt = excerpt
        self.reason = f"http_{status}"
        self.headers = {"Busway-Http-Status": str(status)}


class HttpRetryableStatus(RetryableError):
    """The peer answered a transient status; retry after `retry_after` if it gave one."""

    def __init__(self, message: str, *, status: int, retry_after: float | None) -> None:
        super().__init__(message, retry_after=retry_after)
        self.status = status
        self.reason = f"http_{status}"
        self.headers = {"Busway-Http-Status": str(status)}


def error_for(reply: Reply, method: str, url: str) -> DeliveryError | None:
    """None for a 2xx reply, else the error that makes the engine retry or dead-letter."""
    status = reply.status
    if 200 <= status < 300:
        return None
    excerpt = reply.excerpt.decode("utf-8", "replace")
    what = f"HTTP {status} {reply.reason} from {method} {redact(url)}"
    if status in _TRANSIENT or status >= 500:
        retry_after = parse_retry_after(reply.headers.get("Retry-After"))
        hint = f" (Retry-After {retry_after:g}s)" if retry_after is not None else ""
        return HttpRetryableStatus(
            f"{what}{hint}: {excerpt}", status=status, retry_after=retry_after
        )
    if 300 <= status < 400:
        location = reply.headers.get("Location", "?")
        excerpt = f"redirects to {location}; redirects are not followed, fix the sink's url"
    return HttpStatusError(f"{what}: {excerpt}", status=status, excerpt=excerpt)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a `Retry-After` of delay-seconds or an HTTP-date; None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), _MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # HTTP-dates are GMT; one without a zone is not an HTTP-date
    delay = when.timestamp() - (time.time() if now is None else now)
    return min(max(0.0, delay), _MAX_RETRY_AFTER)
