"""Error answers as RFC 9457 problem details: what was wrong, where, and what to do about it."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response

__all__ = ["Problem", "problem"]


class Problem(Exception):
    """An error answer raised from deep inside request handling, rendered by `response()`.

    `field` names what was wrong (`header.Idempotency-Key`, `path.region`, `body`), as an
    RFC 9457 extension member, so a client can point at it without parsing `detail`.
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
    ) -> None:
        super().__init__(detail)
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
