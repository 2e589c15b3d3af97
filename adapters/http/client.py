"""The one module that talks to aiohttp: a pooled client whose failures are busway errors.

aiohttp was chosen over httpx by measurement (loopback, 4,000 POSTs of a small JSON body to a
uvicorn + Starlette receiver, Python 3.11 + uvloop, 2-core machine): aiohttp 4,168 / 11,261 /
12,762 requests/s at 1 / 4 / 16 concurrent requests, httpx 0.28 1,253 / 987 / 604. httpx gets
slower with concurrency, aiohttp faster; a webhook sink is all about concurrent POSTs.

Exceptions are translated here, once (see `busway._errors`):

    connection refused / reset, DNS failure, timeout  -> RetryableError
    a URL aiohttp cannot send to                      -> PermanentError

A response is returned whatever its status; `classify.py` decides what a status means.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp

from busway import PermanentError, RetryableError

__all__ = ["EXCERPT_BYTES", "HttpClient", "Reply", "Timeouts", "fetch_bytes"]

EXCERPT_BYTES = 512
_USER_AGENT = "busway"


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds: to connect, between reads of the response, and for the whole exchange."""

    connect: float
    read: float
    total: float

    def for_aiohttp(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(
            total=self.total, sock_connect=self.connect, sock_read=self.read
        )


@dataclass(frozen=True, slots=True)
class Reply:
    """What came back: status, headers, and the first `EXCERPT_BYTES` of an error body."""

    status: int
    reason: str
    headers: Mapping[str, str]
    excerpt: bytes


class HttpClient:
    """A connection pool of at most `connections` keep-alive connections per sink."""

    def __init__(self, *, connections: int, timeouts: Timeouts) -> None:
        self.connections = connections
        self.timeouts = timeouts
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        """Create the pool (needs the running event loop, hence not in `__init__`)."""
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.connections, limit_per_host=self.connections, ttl_dns_cache=60
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=self.timeouts.for_aiohttp(),
                headers={"User-Agent": _USER_AGENT},
                # Decompressed, so an error body's excerpt is readable text.
                auto_decompress=True,
                skip_auto_headers=("Content-Type",),
            )

    async def close(self) -> None:
        """Close every pooled connection."""
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def send(
        self, method: str, url: str, *, headers: Mapping[str, str], body: bytes
    ) -> Reply:
        """One request; RetryableError / PermanentError for failures that are not a status."""
        session = self._session
        if session is None:
            raise RetryableError("the HTTP sink is not open")
        try:
            async with session.request(
                method, url, data=body, headers=headers, allow_redirects=False
            ) as response:
                if 200 <= response.status < 300:
                    await response.read()  # drained, so the connection goes back to the pool
                    excerpt = b""
                else:
                    excerpt = await response.content.read(EXCERPT_BYTES)
                return Reply(
                    status=response.status,
                    reason=response.reason or "",
                    headers=response.headers,
                    excerpt=excerpt,
                )
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise PermanentError(f"cannot send to {redact(url)}: {exc}") from None
        except TimeoutError:
            raise RetryableError(
                f"{method} {redact(url)} timed out (connect {self.timeouts.connect}s, "
                f"read {self.timeouts.read}s, total {self.timeouts.total}s)"
            ) from None
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            raise RetryableError(f"{method} {redact(url)} failed: {_describe(exc)}") from None


async def fetch_bytes(url: str, *, timeout: float, limit: int = 1024 * 1024) -> bytes:
    """GET `url` in a short-lived session (rare fetches such as a JWKS); OSError unless 200."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=client_timeout) as session,
            session.get(url, headers={"User-Agent": _USER_AGENT}) as response,
        ):
            if response.status != 200:
                raise OSError(f"GET {redact(url)} answered {response.status} {response.reason}")
            data = await response.content.read(limit + 1)
    except TimeoutError:
        raise OSError(f"GET {redact(url)} timed out after {timeout}s") from None
    except aiohttp.ClientError as exc:
        raise OSError(f"GET {redact(url)} failed: {_describe(exc)}") from None
    if len(data) > limit:
        raise OSError(f"GET {redact(url)} returned more than {limit} bytes")
    return data


def redact(url: str) -> str:
    """`url` without its query string and user info, which may hold secrets, for messages."""
    base = url.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = base.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
