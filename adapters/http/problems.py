"""Error answers as RFC 9457 problem details: what was wrong, and what to do about it."""

from __future__ import annotations

import orjson
from starlette.responses import Response

__all__ = ["problem"]


def problem(
    status: int, slug: str, title: str, detail: str, *, headers: dict[str, str] | None = None
) -> Response:
    """An `application/problem+json` response; `slug` names the problem type for machines."""
    body = {
        "type": f"urn:busway:problem:{slug}",
        "title": title,
        "status": status,
        "detail": detail,
    }
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/problem+json",
        headers=headers,
    )
