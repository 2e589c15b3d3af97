"""`Bus`: runs a whole config — NATS, streams, sinks, routes, sources and the HTTP listener.

    async with Bus.from_file("busway.toml") as bus:
        await bus.wait_until_stopped()      # until bus.stop(), e.g. from a signal handler

Start-up order is downstream first: the embedded server, the connection, every stream, then
sinks, routes and finally sources and the listener, each through `task_group.start()`, so a bad
port or a refused stream raises here instead of leaving a half-started bus.

Leaving the block shuts down gracefully: the listener stops taking requests and finishes those
in progress, sources stop, and meanwhile routes and sinks stop pulling and settle what they
hold (all bounded by `shutdown_timeout`); then acks are flushed, the connection closes and the
embedded server stops.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import AsyncGenerator
from typing import Any, Self

import anyio
from anyio import AsyncContextManagerMixin
from anyio.abc import TaskGroup, TaskStatus
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from busway._components import SourceContext
from busway._config import Config, RouteConfig, SinkConfig, load_config, locate_in_file
from busway._consumer import ConsumerComponent
from busway._embedded import EmbeddedNatsServer
from busway._errors import BuswayError, ConfigError
from busway._jetstream import (
    JetStreamPublisher,
    KeyValueState,
    connect,
    ensure_stream,
    state_bucket,
)
from busway._listener import DeferredApp, Listener, build_app
from busway._metrics import ComponentStats, MetricsCollector, new_registry
from busway._plan import Plan, build_plan
from busway._registry import AdapterRegistry, default_registry
from busway._requests import Requester
from busway._route_services import NatsRouteServices
from busway._route_worker import RouteWorker
from busway._sink_worker import SinkWorker

__all__ = ["Bus"]

logger = logging.getLogger("busway")


class Bus(AsyncContextManagerMixin):
    """A running busway: everything in `config`, in one anyio task group.

    Construction compiles the config (expressions, adapters) and raises ConfigError; entering
    the context starts everything and raises StartupError if any part cannot start.
    """

    def __init__(
        self,
        config: Config,
        *,
        registry: AdapterRegistry | None = None,
        serve_http: bool = True,
    ) -> None:
        self.config = config
        self.serve_http = serve_http
        """False: do not bind `[http] listen`; the application mounts `asgi` in its own server."""
        self.asgi = DeferredApp()
        """busway's HTTP app (sources, /metrics, /healthz, /readyz) for mounting in yours."""
        self.registry = registry or default_registry()
        self.plan: Plan = build_plan(config, self.registry)
        self.metrics = MetricsCollector()
        self.metrics_registry = new_registry(self.metrics)
        self.nats_url: str | None = None
        self.http_port: int | None = None
        self.app: Starlette | None = None
        self._client: NatsClient | None = None
        self._workers: list[ConsumerComponent] = []
        self._requester: Requester | None = None
        self._sources_scope: anyio.CancelScope | None = None
        self._listener: Listener | None = None
        self._listener_done = anyio.Event()
        self._stop_requested = anyio.Event()

    @classmethod
    def from_file(
        cls, path: str | os.PathLike[str], *, registry: AdapterRegistry | None = None
    ) -> Bus:
        """A bus for the TOML config at `path`; ConfigError names file, key and line."""
        registry = registry or default_registry()
        config = load_config(
            path, source_types=registry.source_config, sink_types=registry.sink_config
        )
        try:
            return cls(config, registry=registry)
        except ConfigError as error:
            raise locate_in_file(error, path) from None

    def stop(self) -> None:
        """Ask the bus to stop; `wait_until_stopped` returns and the context exits gracefully."""
        self._stop_requested.set()

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stop_requested.is_set()

    async def wait_until_stopped(self) -> None:
        """Block until `stop()` is called."""
        await self._stop_requested.wait()

    def readiness(self) -> dict[str, bool]:
        """Readiness checks by name: the NATS connection and every component."""
        checks = {"nats": bool(self._client and self._client.is_connected)}
        for stats in self.metrics.stats:
            checks[f"{stats.kind}:{stats.name}"] = stats.ready
        return checks

    @contextlib.asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        try:
            async with self._running() as bus:
                yield bus
        except BaseExceptionGroup as group:
            # Task groups wrap errors; a lone busway error (a source that cannot start, a
            # certificate that does not load) is what the caller should see, unwrapped.
            leaves = _leaves(group)
            if len(leaves) == 1 and isinstance(leaves[0], BuswayError):
                raise leaves[0] from None
            raise

    @contextlib.asynccontextmanager
    async def _running(self) -> AsyncGenerator[Self]:
        config = self.config
        async with contextlib.AsyncExitStack() as stack:
            servers = config.nats.servers
            if servers is None:
                embedded = EmbeddedNatsServer(
                    config.nats, config.resolve_path(config.nats.data_dir)
                )
                await embedded.start()
                stack.push_async_callback(embedded.stop)
                servers = [embedded.url]
            self.nats_url = servers[0]
            client = await connect(config.nats, servers, on_reconnected=self._on_reconnected)
            self._client = client
            stack.push_async_callback(self._close_client, client)
            js = client.jetstream(publish_async_max_pending=config.nats.publish_window)
            for stream in [*config.streams, config.dead_letter_stream]:
                await ensure_stream(js, stream)
            async with anyio.create_task_group() as tg:
                await self._start_workers(tg, client, js)
                http_routes: list[BaseRoute] | None = (
                    [] if config.http.listen or not self.serve_http else None
                )
                await tg.start(self._run_sources, js, http_routes)
                if http_routes is not None:
                    self.app = build_app(
                        http_routes, registry=self.metrics_registry, readiness=self.readiness
                    )
                    self.asgi.app = self.app
                    if self.serve_http:
                        await self._start_listener(tg, self.app)
                # Everything allocated so far lives as long as the bus: take it out of the
                # cyclic GC's generations so collections triggered by per-message garbage stay
                # cheap.
                gc.freeze()
                logger.info(
                    "busway ready: %d source(s), %d route(s), %d sink(s)",
                    len(self.plan.sources),
                    len(self.plan.routes),
                    len(self.plan.sinks),
                )
                try:
                    yield self
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._drain()
                    self.asgi.app = None  # a mounted app answers 503 from now on
                    tg.cancel_scope.cancel()

    async def _start_workers(self, tg: TaskGroup, client: NatsClient, js: JetStreamContext) -> None:
        config = self.config
        common = {"client": client, "js": js, "publish_timeout": config.nats.publish_timeout}
        for sink_config, sink in self.plan.sinks:
            worker: ConsumerComponent = SinkWorker(
                sink=sink,
                batch_size=sink_config.batch_size,
                batch_wait=sink_config.batch_wait,
                circuit=sink_config.circuit,
                stats=self.metrics.add(ComponentStats(sink_config.name, "sink")),
                **self._consumer_settings(sink_config, "sink"),
                **common,
            )
            await tg.start(worker.run)
            self._workers.append(worker)
        requester = Requester(
            client, js, is_stored=self._is_stored, publish_timeout=config.nats.publish_timeout
        )
        self._requester = requester
        for route_config, route in self.plan.routes:
            stats = self.metrics.add(ComponentStats(route_config.name, "route"))
            worker = RouteWorker(
                route=route,
                services=NatsRouteServices(js, requester, stats),
                state_bucket=config.state_bucket,
                stats=stats,
                **self._consumer_settings(route_config, "route"),
                **common,
            )
            await tg.start(worker.run)
            self._workers.append(worker)

    def _is_stored(self, subject: str) -> bool:
        return self.config.stream_for(subject) is not None

    def _consumer_settings(self, component: RouteConfig | SinkConfig, kind: str) -> dict[str, Any]:
        stream = component.stream
        if stream is None:
            captured = self.config.stream_for(component.from_)
            assert captured is not None  # the config check guarantees a capturing stream
            stream = captured.name
        return {
            "stream": stream,
            "filter_subject": component.from_,
            "durable": f"busway-{kind}-{component.name}",
            "max_in_flight": component.max_in_flight,
            "ack_wait": float(component.ack_wait),
            "retry": component.retry,
            "dead_letter_subject": self.config.dead_letter_subject(component),
        }

    async def _run_sources(
        self,
        js: JetStreamContext,
        http_routes: list[BaseRoute] | None,
        *,
        task_status: TaskStatus[None],
    ) -> None:
        publisher = JetStreamPublisher(js, timeout=self.config.nats.publish_timeout)
        bucket = await state_bucket(js, self.config.state_bucket) if self.plan.sources else None
        with anyio.CancelScope() as scope:
            self._sources_scope = scope
            async with anyio.create_task_group() as tg:
                for source_config, source in self.plan.sources:
                    assert bucket is not None  # created above whenever there are sources
                    stats = self.metrics.add(ComponentStats(source_config.name, "source"))
                    context = SourceContext(
                        name=source_config.name,
                        publisher=publisher,
                        state=KeyValueState(bucket, f"{source_config.name}."),
                        stats=stats,
                        logger=logging.getLogger(f"busway.source.{source_config.name}"),
                        dead_letter_subject=(
                            f"{self.config.dead_letter.subject_prefix}.{source_config.name}"
                        ),
                        http_routes=http_routes,
                        requester=self._requester,
                    )
                    await tg.start(source.run, context)
                    stats.ready = True
                task_status.started()

    async def _start_listener(self, tg: TaskGroup, app: Starlette) -> None:
        http = self.config.http
        assert http.listen is not None
        listener = Listener(
            app,
            http.listen,
            tls_cert=self.config.resolve_path(http.tls_cert) if http.tls_cert else None,
            tls_key=self.config.resolve_path(http.tls_key) if http.tls_key else None,
        )
        self._listener = listener

        async def serve(*, task_status: TaskStatus[None]) -> None:
            try:
                await listener.run(task_status=task_status)
            finally:
                self._listener_done.set()

        await tg.start(serve)
        self.http_port = listener.port

    async def _drain(self) -> None:
        """Stop sources and consumers at once, each finishing what it holds.

        They need no particular order: a source's messages are stored in a stream before it
        answers, and a route or sink that stops pulling leaves the rest in its stream.
        """
        timeout = float(self.config.shutdown_timeout)
        logger.info("stopping: finishing in-flight work (at most %.0fs)", timeout)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._stop_sources, timeout)
            for worker in self._workers:
                tg.start_soon(worker.drain, timeout)

    async def _stop_sources(self, timeout: float) -> None:
        if self._listener is not None:
            self._listener.stop()
            with anyio.move_on_after(timeout):
                await self._listener_done.wait()
        if self._sources_scope is not None:
            self._sources_scope.cancel()

    async def _on_reconnected(self) -> None:
        for worker in self._workers:
            await worker.reset_pull()

    async def _close_client(self, client: NatsClient) -> None:
        with anyio.move_on_after(5, shield=True):
            if not client.is_closed:
                with contextlib.suppress(Exception):
                    await client.flush(timeout=2)
                await client.close()


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside `group` and its nested groups."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves
