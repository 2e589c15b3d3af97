"""A real HTTP receiver for the HTTP adapters' tests: uvicorn + Starlette on a loopback port.

`Receiver` records every request it gets and answers what the test's `respond` function says
(200 by default). Like a careful webhook handler it deduplicates on `Idempotency-Key`:
`handled` counts, per key, how often a 2xx answer was given for it, so a test can assert that
every message was handled exactly once.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskStatus
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from busway._ingress.listener import Listener


@dataclass(frozen=True)
class Seen:
    """One request as the receiver saw it."""

    number: int
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes
    at: float


Respond = Callable[[Seen], Response]


def ok(_: Seen) -> Response:
    return Response(b"", status_code=200)


@dataclass
class Receiver:
    """Records requests to any path and answers with `respond(seen)`."""

    respond: Respond = ok
    seen: list[Seen] = field(default_factory=list)
    handled: Counter[str] = field(default_factory=Counter)
    in_flight: int = 0
    max_in_flight: int = 0
    hold_until: int = 0
    """Hold each request until this many are in flight at once (or 10 s passed)."""

    def __post_init__(self) -> None:
        self._enough = anyio.Event()

    async def endpoint(self, request: Request) -> Response:
        body = await request.body()
        seen = Seen(
            number=len(self.seen) + 1,
            method=request.method,
            path=request.url.path,
            query=request.url.query,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        self.seen.append(seen)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.hold_until:
                if self.in_flight >= self.hold_until:
                    self._enough.set()
                with anyio.move_on_after(10):
                    await self._enough.wait()
            response = self.respond(seen)
        finally:
            self.in_flight -= 1
        key = seen.headers.get("idempotency-key")
        if key is not None and 200 <= response.status_code < 300:
            self.handled[key] += 1
        return response

    def app(self) -> Starlette:
        methods = ["GET", "POST", "PUT", "PATCH"]
        return Starlette(routes=[Route("/{path:path}", self.endpoint, methods=methods)])


@asynccontextmanager
async def serving(app: Starlette, port: int = 0) -> AsyncIterator[str]:
    """Serve `app` on 127.0.0.1:`port` (0 = any free port); yields its base URL."""
    async with running_listener(Listener(app, f"127.0.0.1:{port}")) as listener:
        yield f"http://127.0.0.1:{listener.port}"


@asynccontextmanager
async def running_listener(listener: Listener) -> AsyncIterator[Listener]:
    """Run `listener` for the block.

    The server is stopped gracefully even when the test fails inside: cancelling uvicorn
    mid-serve would leave its loop unable to close.
    """
    done = anyio.Event()

    async def run(*, task_status: TaskStatus[None]) -> None:
        try:
            await listener.run(task_status=task_status)
        finally:
            done.set()

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        try:
            yield listener
        finally:
            listener.stop()
            with anyio.CancelScope(shield=True), anyio.move_on_after(15):
                await done.wait()
