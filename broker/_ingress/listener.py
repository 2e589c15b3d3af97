"""The shared HTTP listener: HTTP sources' routes plus `/metrics`, `/status`, `/healthz` and
`/readyz` (the first two optionally on a separate admin listener).

uvicorn (with httptools and uvloop) serves a Starlette router. busway binds the socket itself,
so a port already in use is a StartupError at start-up instead of uvicorn's `sys.exit`, and
turns off uvicorn's own signal handlers, because the daemon (or the embedding application)
owns shutdown: `stop()` lets in-flight requests finish, then closes.

The app is plain ASGI, so an application can mount busway's routes into its own ASGI server
instead of running this listener: `Bus(config, serve_http=False)` and mount `bus.asgi`; the
host server then owns the limits and the admin protection this listener adds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
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

from busway._config.model import HttpConfig, split_listen
from busway._errors import StartupError
from busway._ingress.buckets import TokenBuckets
from busway._ingress.edge import EdgeLimits, EdgeProtocol, EdgeStats, connection_budget
from busway._ingress.guard import ClientGuard, GuardPolicy

__all__ = ["DeferredApp", "Listener", "bind_socket", "build_app"]

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
    """Runs an ASGI app on `listen` (host:port) until `stop()`; HTTPS when given a cert/key.

    With `settings` (the `[http]` table) the listener enforces its limits (`edge.py`), checks
    clients before the app sees them (`guard.py`) and, with `admin_listen`, serves `/metrics`
    and `/status` on a second socket of its own. Without, it serves `app` with the default
    limits and no guard (a test's partner server).
    """

    def __init__(
        self,
        app: ASGIApp,
        listen: str,
        *,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        settings: HttpConfig | None = None,
        registry: CollectorRegistry | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.app = app
        self.reuse_port = reuse_port
        """Bind with SO_REUSEPORT: processes of one user share the port (`--workers`)."""
        self.host, self.port = split_listen(listen)
        self.tls_cert = tls_cert
        self.tls_key = tls_key
        self.settings = settings
        self.stats = EdgeStats()
        if registry is not None:
            registry.register(self.stats)
        self._registry = registry
        self.admin_host: str | None = None
        self.admin_port: int | None = None
        if settings is not None and settings.admin_listen is not None:
            self.admin_host, self.admin_port = split_listen(settings.admin_listen)
        self._servers: list[_EmbeddedServer] = []
        self._sockets: list[socket.socket] = []
        self._stopping = False

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
        """Load the certificate and take the port(s) now; StartupError if any fails.

        The bus calls this before it starts anything else, so a taken port or a bad
        certificate stops start-up before an embedded server or a connection exists.
        Connections arriving before `run()` serves wait in the listen backlog.
        """
        if self._sockets:
            return
        self._check_tls()
        self._sockets.append(_bind(self.host, self.port, "listen", reuse_port=self.reuse_port))
        self.port = self._sockets[0].getsockname()[1]
        if self.admin_host is not None and self.admin_port is not None:
            try:
                self._sockets.append(
                    _bind(
                        self.admin_host, self.admin_port, "admin_listen", reuse_port=self.reuse_port
                    )
                )
            except StartupError:
                self.close()
                raise
            self.admin_port = self._sockets[1].getsockname()[1]

    def close(self) -> None:
        """Release the port(s) of a listener that `bind()` took but that will not serve."""
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def _limits(self) -> EdgeLimits:
        settings = self.settings
        if settings is None:
            return EdgeLimits(max_connections=connection_budget(None), stats=self.stats)
        return EdgeLimits(
            max_header_bytes=settings.max_header_bytes,
            max_headers=settings.max_headers,
            header_timeout=float(settings.header_timeout),
            body_timeout=float(settings.body_timeout),
            body_min_rate=float(settings.body_min_rate),
            max_connections=connection_budget(settings.max_connections, len(self._sockets)),
            stats=self.stats,
        )

    def _apps(self) -> list[ASGIApp]:
        """The app each socket serves: the bus's app behind the guard (when configured)."""
        settings = self.settings
        if settings is None:
            return [self.app]
        failures = settings.auth_failure_limit
        limit = settings.rate_limit
        base = GuardPolicy(
            stats=self.stats,
            failures=TokenBuckets(failures.rate, failures.burst, failures.max_clients),
            rate_limit=(
                TokenBuckets(limit.rate, limit.burst, limit.max_clients) if limit else None
            ),
            trusted_proxies=tuple(
                ipaddress.ip_network(p, strict=False) for p in settings.trusted_proxies
            ),
            admin_token=settings.admin_token,
            admin_elsewhere=len(self._sockets) > 1,
        )
        apps: list[ASGIApp] = [ClientGuard(self.app, base)]
        if len(self._sockets) > 1:
            admin = dataclasses.replace(base, admin_only=True, admin_elsewhere=False)
            apps.append(ClientGuard(self.app, admin))
        return apps

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind unless `bind()` did (StartupError if taken), report started, serve until
        `stop()`."""
        self.bind()
        limits = self._limits()
        protocol = EdgeProtocol.with_limits(limits)
        keepalive = float(self.settings.keepalive_timeout) if self.settings else 5.0
        for app in self._apps():
            config = uvicorn.Config(
                app,
                log_config=None,
                access_log=False,
                http=protocol,
                lifespan="off",
                timeout_graceful_shutdown=10,
                server_header=False,
                ssl_certfile=self.tls_cert,
                ssl_keyfile=self.tls_key,
            )
            # uvicorn types it as int, but uses it as a timer delay: fractions work.
            config.timeout_keep_alive = keepalive  # type: ignore[assignment]
            server = _EmbeddedServer(config)
            self.stats.open_connections.append(server.server_state.connections)
            self._servers.append(server)
        logger.info("HTTP listening on %s://%s:%d", self.scheme, self.host, self.port)
        if self.admin_port is not None:
            logger.info(
                "HTTP admin listening on %s://%s:%d", self.scheme, self.admin_host, self.admin_port
            )
        task_status.started()
        try:
            async with anyio.create_task_group() as tg:
                for server, sock in zip(self._servers, self._sockets, strict=True):
                    tg.start_soon(server.serve, [sock])
                if self._stopping:
                    self.stop()
        finally:
            self.close()
            if self._registry is not None:
                self._registry.unregister(self.stats)
                self._registry = None

    def stop(self) -> None:
        """Stop accepting; requests in progress finish (bounded by the graceful timeout)."""
        self._stopping = True
        for server in self._servers:
            server.should_exit = True


def _bind(host: str, port: int, key: str, *, reuse_port: bool = False) -> socket.socket:
    """A listening TCP socket on host:port; StartupError naming `[http] key` if taken."""
    sock = bind_socket(host, port, key, reuse_port=reuse_port)
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def bind_socket(host: str, port: int, key: str, *, reuse_port: bool = False) -> socket.socket:
    """A TCP socket bound to host:port, not yet listening; StartupError naming `[http] key`.

    With `reuse_port` (SO_REUSEPORT) other sockets of the same user that set it too may bind
    the same port, and the kernel spreads new connections over those that listen: how the
    workers of `busway run --workers` share one port. A socket that is bound but does not
    listen receives no connections; the supervisor holds one so the port stays reserved
    while a worker restarts.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets whose `proto`
    # says TCP, and without it Nagle plus delayed ACKs held every response ~44 ms.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {host}:{port} ([http] {key}): {exc.strerror}; "
            "choose another port or stop whatever uses it"
        ) from None
    return sock
