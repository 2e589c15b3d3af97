"""Error answers as RFC 9457 problem details: what was wrong, where, and what to do about it.

A detail never carries internal names (URLs, streams, subjects) or a library's exception text:
the caller may not be authenticated. Those go to the log.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

__all__ = ["Problem", "problem", "publish_failed"]


class Problem(Exception):
    """An error answer raised from deep inside request handling, rendered by `response()`.

    `field` names what was wrong (`header.Idempotency-Key`, `path.region`, `body`), as an
    RFC 9457 extension member, so a client can point at it without parsing `detail`.
    `reason` is for busway's metrics only (why a 401 was a 401), never part of the answer.
    """

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str,
        *,
        field: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        """The metric label when it says more than the caller may read (default: the slug)."""
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.field = field
        self.headers = headers

    def body(self) -> dict[str, Any]:
        """The problem as a JSON object."""
        body: dict[str, Any] = {
            "type": f"urn:busway:problem:{self.slug}",
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
        }
        if self.field is not None:
            body["field"] = self.field
        return body

    def response(self) -> Response:
        """The `application/problem+json` response."""
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            media_type="application/problem+json",
            headers=self.headers,
        )


def problem(
    status: int,
    slug: str,
    title: str,
    detail: str,
    *,
    field: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """An `application/problem+json` response; `slug` names the problem type for machines."""
    return Problem(status, slug, title, detail, field=field, headers=headers).response()


def publish_failed(*, unconfirmed: bool, keyed: bool, what: str, retry_after: int) -> Problem:
    """503 for a publish JetStream did not confirm, saying whether `what` may be stored.

    `unconfirmed` (sent, PubAck missing): it MAY have been stored, and only a retry with the
    same `Idempotency-Key` is safe (deduplicated). Otherwise nothing was stored.
    """
    headers = {"Retry-After": str(retry_after)}
    if not unconfirmed:
        return Problem(
            503,
            "unavailable",
            "Service Unavailable",
            f"the {what} was not stored; retry later",
            headers=headers,
        )
    retry = (
        "retry with the same Idempotency-Key: if it was stored, the retry is deduplicated"
        if keyed
        else "a retry may store it twice: send requests with an Idempotency-Key to retry safely"
    )
    return Problem(
        503,
        "not-confirmed",
        "Service Unavailable",
        f"the {what} was sent but its storage was not confirmed: it MAY have been accepted; "
        + retry,
        headers=headers,
    )
