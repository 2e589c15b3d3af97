"""What the listener checks before any source sees a request: who the client is, how often it
may ask, and whether it may read `/metrics` and `/status`.

* The client's address is the TCP peer, or, when the peer is one of `trusted_proxies`, the
  right-most address in `X-Forwarded-For` that is not itself a trusted proxy (everything left
  of it was written by the client and proves nothing). The ASGI scope's `client` is set to it,
  so the sources' own per-client limits see the same address.
* Two token buckets per address run before authentication: `rate_limit` (every request) and
  `auth_failure_limit` (drained only by 401 answers). An address that spent either gets 429
  without its credentials being checked: brute force of API keys or tokens is slowed to the
  failure bucket's rate, while clients that authenticate never spend failure tokens.
* `/metrics` and `/status` need `admin_token` when one is set, and are served only on the
  admin listener when there is one. `/healthz` and `/readyz` are always open and never limited:
  orchestrators probe them, and they say nothing an outsider can use.

Answers say only what the caller may know; the reason is a label of
`busway_http_refused_total` and a log line.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from busway._ingress.buckets import TokenBuckets
from busway._ingress.edge import EdgeStats

__all__ = ["ADMIN_PATHS", "PROBE_PATHS", "ClientGuard", "GuardPolicy", "client_address"]

logger = logging.getLogger("busway.http")

ADMIN_PATHS = frozenset({"/metrics", "/status"})
PROBE_PATHS = frozenset({"/healthz", "/readyz"})

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """The checks of one listener; the buckets are shared by the listeners of one bus."""

    stats: EdgeStats
    failures: TokenBuckets | None = None
    rate_limit: TokenBuckets | None = None
    trusted_proxies: tuple[_Network, ...] = ()
    admin_token: str | None = None
    admin_only: bool = False
    """This is the admin listener: only the admin and probe endpoints are served."""
    admin_elsewhere: bool = False
    """An admin listener exists: the admin endpoints are not served on this one."""


def client_address(
    peer: str | None, forwarded: Sequence[bytes], trusted: Sequence[_Network]
) -> str | None:
    """The client's address: `peer`, or behind trusted proxies the right-most untrusted hop."""
    if peer is None or not trusted or not forwarded or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for value in forwarded for h in value.decode("latin-1").split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # a forged or garbled entry: nothing left of it can be believed
        client = hop
        if not _is_trusted(hop, trusted):
            break
    return client


def _is_trusted(address: str, trusted: Sequence[_Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


class ClientGuard:
    """ASGI middleware applying a `GuardPolicy` in front of the bus's app."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy
        self._token = policy.admin_token.encode() if policy.admin_token is not None else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check the request; pass it on, or answer 404, 401 or 429 here."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        path: str = scope["path"]
        if path in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        admin = path in ADMIN_PATHS
        if (policy.admin_only and not admin) or (admin and policy.admin_elsewhere):
            await _answer(send, 404, "not-found", "Not Found", "nothing is served at this path")
            return
        address = self._address(scope)
        if policy.failures is not None:
            wait = policy.failures.wait(address)
            if wait > 0:
                await self._limited(send, address, wait, "auth_failures")
                return
        if policy.rate_limit is not None:
            wait = policy.rate_limit.take(address)
            if wait > 0:
                await self._limited(send, address, wait, "rate_limited")
                return
        if admin and self._token is not None and not self._authorized(scope):
            self._failed(address)
            policy.stats.count("admin_unauthorized")
            logger.info("401 for %s from %s: no valid admin token", path, address)
            await _answer(
                send,
                401,
                "unauthorized",
                "Unauthorized",
                "the request carries no valid credentials",
                (b"www-authenticate", b'Bearer realm="busway-admin"'),
            )
            return
        if policy.failures is None:
            await self.app(scope, receive, send)
            return

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 401:
                self._failed(address)
            await send(message)

        await self.app(scope, receive, watch)

    def _address(self, scope: Scope) -> str:
        peer = scope.get("client")
        host = peer[0] if peer else None
        trusted = self.policy.trusted_proxies
        if trusted and host is not None:
            forwarded = [v for k, v in scope["headers"] if k == b"x-forwarded-for"]
            client = client_address(host, forwarded, trusted)
            if client is not None and client != host:
                scope["client"] = (client, 0)
                host = client
        return host or "unknown"

    def _authorized(self, scope: Scope) -> bool:
        assert self._token is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    return hmac.compare_digest(token.strip(), self._token)
        return False

    def _failed(self, address: str) -> None:
        if self.policy.failures is not None:
            self.policy.failures.take(address)

    async def _limited(self, send: Send, address: str, wait: float, reason: str) -> None:
        self.policy.stats.count(reason)
        logger.info("429 for %s: %s", address, reason.replace("_", " "))
        await _answer(
            send,
            429,
            "rate-limited",
            "Too Many Requests",
            "too many requests from this address; retry after the Retry-After delay",
            (b"retry-after", str(max(1, math.ceil(wait))).encode()),
        )


async def _answer(
    send: Send,
    status: int,
    slug: str,
    title: str,
    detail: str,
    header: tuple[bytes, bytes] | None = None,
) -> None:
    body = b'{"type":"urn:busway:problem:%s","title":"%s","status":%d,"detail":"%s"}' % (
        slug.encode(),
        title.encode(),
        status,
        detail.encode(),
    )
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if header is not None:
        headers.append(header)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
