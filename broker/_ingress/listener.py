"""The shared HTTP listener: HTTP sources' routes plus `/metrics`, `/healthz` and `/readyz`.

uvicorn (with httptools and uvloop) serves a Starlette router. busway binds the socket itself,
so a port already in use is a StartupError at start-up instead of uvicorn's `sys.exit`, and
turns off uvicorn's own signal handlers, because the daemon (or the embedding application)
owns shutdown: `stop()` lets in-flight requests finish, then closes.

The app is plain ASGI, so an application can mount busway's routes into its own ASGI server
instead of running this listener: `Bus(config, serve_http=False)` and mount `bus.asgi`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import uvicorn
from anyio.abc import TaskStatus
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from busway._config.model import split_listen
from busway._errors import StartupError

__all__ = ["DeferredApp", "Listener", "build_app"]

logger = logging.getLogger("busway.http")


def build_app(
    routes: Sequence[BaseRoute],
    *,
    registry: CollectorRegistry,
    readiness: Callable[[], dict[str, str | None]],
    status: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    health: Callable[[], dict[str, bool]] | None = None,
) -> Starlette:
    """The ASGI app: the sources' `routes` plus the operational endpoints.

    `/healthz` is liveness: 503 when a `health` check fails (the embedded nats-server is down:
    part of this process, unlike an external server, whose loss only makes `/readyz` 503).

    `readiness` gives each check's name and why it fails (None when it passes): `/readyz`
    answers 503 with those reasons while any fails.
    """

    async def status_page(_: Request) -> Response:
        assert status is not None
        return JSONResponse(await status())

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_: Request) -> Response:
        checks = health() if health is not None else {}
        if all(checks.values()):
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "checks": checks}, status_code=503)

    async def readyz(_: Request) -> Response:
        reasons = readiness()
        failing = {name: reason for name, reason in reasons.items() if reason is not None}
        body: dict[str, Any] = {
            "status": "not ready" if failing else "ready",
            "checks": {name: reason is None for name, reason in reasons.items()},
        }
        if failing:
            body["reasons"] = failing
        return JSONResponse(body, status_code=503 if failing else 200)

    operational = [
        Route("/metrics", metrics, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    if status is not None:
        operational.append(Route("/status", status_page, methods=["GET"]))
    return Starlette(routes=[*operational, *routes])


class _EmbeddedServer(uvicorn.Server):
    """uvicorn without its signal handlers: whoever runs the bus decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class DeferredApp:
    """A stable ASGI entry point for an application to mount before the bus has started.

    It answers 503 (with `Retry-After`) until the bus has built its app, then forwards every
    request to it: `Mount("/bus", app=bus.asgi)` works at import time of the host app.
    """

    def __init__(self) -> None:
        self.app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Forward to the bus's app, or answer 503 while there is none."""
        app = self.app
        if app is not None:
            await app(scope, receive, send)
            return
        if scope["type"] != "http":
            return
        response = JSONResponse(
            {"status": "busway is not running"}, status_code=503, headers={"Retry-After": "1"}
        )
        await response(scope, receive, send)


class Listener:
    """Runs an ASGI app on `listen` (host:port) until `stop()`; HTTPS when given a cert/key."""

    def __init__(
        self,
        app: ASGIApp,
        listen: str,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.app = app
        self.host, self.port = split_listen(listen)
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self._server: _EmbeddedServer | None = None
        self._socket: socket.socket | None = None

    @property
    def scheme(self) -> str:
        """`https` with TLS, else `http`."""
        return "https" if self.tls_cert else "http"

    def _check_tls(self) -> None:
        """Load the certificate now so a bad cert/key is a clear start-up error."""
        if self.tls_cert is None or self.tls_key is None:
            return
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"cannot load the TLS certificate {self.tls_cert} / key {self.tls_key} "
                f"([http] tls_cert, tls_key): {exc}"
            ) from None

    def bind(self) -> None:
        """Load the certificate and take the port now; StartupError if either fails.

        The bus calls this before it starts anything else, so a taken port or a bad
        certificate stops start-up before an embedded server or a connection exists.
        Connections arriving before `run()` serves wait in the listen backlog.
        """
        if self._socket is not None:
            return
        self._check_tls()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose `proto`
        # says TCP, and without it Nagle plus delayed ACKs held every response ~44 ms.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot listen on {self.host}:{self.port} ([http] listen): {exc.strerror}; "
                "choose another port or stop whatever uses it"
            ) from None
        sock.listen(2048)
        sock.setblocking(False)
        self.port = sock.getsockname()[1]
        self._socket = sock

    def close(self) -> None:
        """Release the port of a listener that `bind()` took but that will not serve."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind unless `bind()` did (StartupError if taken), report started, serve until
        `stop()`."""
        self.bind()
        sock = self._socket
        assert sock is not None
        config = uvicorn.Config(
            self.app,
            log_config=None,
            access_log=False,
            http="httptools",
            lifespan="off",
            timeout_graceful_shutdown=10,
            server_header=False,
            ssl_certfile=self.tls_cert,
            ssl_keyfile=self.tls_key,
        )
        self._server = _EmbeddedServer(config)
        logger.info("HTTP listening on %s://%s:%d", self.scheme, self.host, self.port)
        task_status.started()
        try:
            await self._server.serve(sockets=[sock])
        finally:
            self.close()

    def stop(self) -> None:
        """Stop accepting; requests in progress finish (bounded by the graceful timeout)."""
        if self._server is not None:
            self._server.should_exit = True
