"""What an HTTP request's headers put on its message: allow-listed headers and the principal.

    [[sources]]
    type = "http"
    headers = ["X-Tier", "traceparent", "tracestate"]

Only the listed headers pass (matched case-insensitively, stored with the spelling of the
list; repeated fields joined with ", " as RFC 9110 allows). Some can never be listed:
hop-by-hop headers (they describe one connection, not the message), credentials (they must
not travel on the bus), and busway's and NATS's own (`Busway-*`, `Nats-*`), so a caller can
never set a message id, a hop count or a principal.

W3C trace context is carried without being listed: a valid `traceparent` (version `00`,
lowercase hex, non-zero ids) and its `tracestate` (512 characters at most) pass as they came,
so a trace that starts at the caller continues through the routes and sinks. An invalid one
is dropped (never carried half-parsed); listing them changes nothing.

The authenticated principal is stamped by busway itself: `Busway-Principal` (the API key's
name, or the JWT's `sub`) and, for a JWT, `Busway-Principal-Issuer` (its `iss`). A caller's own
`Busway-Principal` header is dropped with every other header not listed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

from starlette.datastructures import Headers

from busway.adapters.http.auth import Identity

__all__ = ["PRINCIPAL", "PRINCIPAL_ISSUER", "HeaderAllowList", "check_allowed", "principal"]

PRINCIPAL = "Busway-Principal"
PRINCIPAL_ISSUER = "Busway-Principal-Issuer"

_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "expect",
    }
)
_CREDENTIALS = frozenset({"authorization", "proxy-authorization", "cookie"})
_RESERVED = ("busway-", "nats-")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz")
_TRACE = ("traceparent", "tracestate")
_TRACEPARENT = re.compile(r"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_MAX_TRACESTATE = 512


def check_allowed(names: Iterable[str], api_key_header: str | None) -> None:
    """ValueError naming the first header that may not be passed through, and why."""
    credentials = _CREDENTIALS | ({api_key_header.lower()} if api_key_header else set())
    seen: set[str] = set()
    for name in names:
        lower = name.lower()
        if not lower or not set(lower) <= _TOKEN_CHARS:
            raise ValueError(f"headers: {name!r} is not a valid header name")
        if lower in seen:
            raise ValueError(f"headers: {name!r} is listed twice")
        seen.add(lower)
        if lower in _HOP_BY_HOP:
            raise ValueError(
                f"headers: {name!r} describes the connection, not the message: it cannot pass"
            )
        if lower in credentials:
            raise ValueError(
                f"headers: {name!r} carries credentials, which never travel on the bus "
                f"(the principal is stamped as {PRINCIPAL} instead)"
            )
        if lower.startswith(_RESERVED):
            raise ValueError(
                f"headers: {name!r} is reserved: busway and NATS set Busway-* and Nats-* "
                "headers themselves, callers never do"
            )


class HeaderAllowList:
    """Picks the listed headers of a request, compiled once per source."""

    def __init__(self, names: Iterable[str]) -> None:
        self._names = [(name.lower(), name) for name in names if name.lower() not in _TRACE]

    def pick(self, headers: Headers) -> dict[str, str]:
        """The listed headers present in `headers`, under their configured spelling, and the
        W3C trace context when valid."""
        picked: dict[str, str] = {}
        for lower, spelled in self._names:
            values = headers.getlist(lower)
            if values:
                picked[spelled] = ", ".join(values)
        parent = headers.get("traceparent")
        if parent is not None and _TRACEPARENT.fullmatch(parent := parent.strip()):
            picked["traceparent"] = parent
            state = ",".join(headers.getlist("tracestate"))
            if state and len(state) <= _MAX_TRACESTATE and state.isprintable():
                picked["tracestate"] = state
        return picked


def principal(identity: Identity | None) -> dict[str, str]:
    """The principal headers of an authenticated caller (none without authentication)."""
    if identity is None:
        return {}
    stamped: dict[str, str] = {}
    if identity.name is not None:
        stamped[PRINCIPAL] = _safe(identity.name)
    if identity.issuer is not None:
        stamped[PRINCIPAL_ISSUER] = _safe(identity.issuer)
    return stamped


def _safe(value: str) -> str:
    """`value` as a header value: a JWT claim with control characters is percent-encoded,
    so it cannot end a header line early."""
    return value if value.isprintable() else quote(value, safe="")
