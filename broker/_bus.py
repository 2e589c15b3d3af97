"""`Bus`: runs a whole config — NATS, streams, sinks, routes, sources and the HTTP listener.

    async with Bus.from_file("busway.toml") as bus:
        await bus.wait_until_stopped()      # until bus.stop(), e.g. from a signal handler

Start-up order: first what is local and cannot wait (the HTTP port and its certificate, the
NATS key files), then downstream first: the embedded server, the connection, every stream, then
sinks, routes and finally sources and the listener, each through `task_group.start()`, so a bad
port or a refused stream raises here instead of leaving a half-started bus. An embedded server
that dies later is restarted on its store (`EmbeddedNatsServer.watch`); if it cannot be, the
bus stops and leaving the block raises why. A source that crashes after it started is
restarted with back-off (`busway._ingress.source_runner`), the rest of the bus untouched.

Leaving the block shuts down gracefully: the listener stops taking requests and finishes those
in progress, sources stop, and meanwhile routes and sinks stop pulling and settle what they
hold (all bounded by `shutdown_timeout`); then acks are flushed, the connection closes and the
embedded server stops.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Self, TypeVar

import anyio
import msgspec
from anyio import AsyncContextManagerMixin
from anyio.abc import TaskGroup, TaskStatus
from prometheus_client.registry import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from busway._components import DedupStore, Lease, Publisher, Sink, Source, SourceContext
from busway._config.model import (
    Config,
    RouteConfig,
    SinkConfig,
    SourceConfig,
    load_config,
    locate_in_file,
)
from busway._config.plan import Plan, build_plan
from busway._delivery.consumer import ConsumerComponent
from busway._delivery.isolation import AttemptLedger, IsolationGate
from busway._egress.circuit import STATE_NAMES
from busway._egress.worker import SinkWorker
from busway._errors import BuswayError, ConfigError, StartupError
from busway._ingress.listener import DeferredApp, Listener, build_app
from busway._ingress.observed import ObservedPublisher
from busway._ingress.source_runner import run_source
from busway._nats.cluster import (
    PubAckWatch,
    check_replicas_possible,
    open_state_bucket,
    shared_consumer_notes,
    until_ready,
)
from busway._nats.embedded import EmbeddedNatsServer, busway_permissions, with_resolved_paths
from busway._nats.jetstream import (
    JetStreamPublisher,
    close_connection,
    connect,
    consumer_state,
    dedup_store,
    ensure_stream,
    fail_unconfirmed,
    jetstream,
    nats_auth,
    open_state,
    server_name_of,
)
from busway._nats.kv import Bucket, KeyValueState
from busway._nats.lease import LeaseKeeper, lease_key, new_holder_id
from busway._nats.partition_subjects import consumer_filter, partition_filter
from busway._nats.requests import Requester
from busway._nats.types import JetStream, NatsClient
from busway._observe.audit import AuditTrail
from busway._observe.metrics import ComponentStats, MetricsCollector, new_registry
from busway._observe.readiness import WriteRefusals, component_reason
from busway._observe.redact import redaction
from busway._observe.status import ComponentStatus, StatusReport
from busway._registry import Adapter, AdapterRegistry, default_registry
from busway._routing.partitions import PartitionedRoute
from busway._routing.services import NatsRouteServices
from busway._routing.worker import RouteWorker
from busway.routers.route import Route

if TYPE_CHECKING:
    from busway._observe.spans import Spans

__all__ = ["Bus", "ReloadReport"]

logger = logging.getLogger("busway")

_T = TypeVar("_T")


class Bus(AsyncContextManagerMixin):
    """A running busway: everything in `config`, in one anyio task group.

    Construction compiles the config (expressions, adapters) and raises ConfigError; entering
    the context starts everything and raises StartupError if any part cannot start.

    `adapters` are added to `registry` (default: every installed adapter); a type name taken
    twice is a ConfigError naming both. The bus leaves process-wide decisions to the
    application: it installs no signal handler, configures no logging and never calls
    `gc.freeze()` (`busway run` does all three; an embedding application decides for itself).

    `reuse_port=True` binds `[http] listen` (and `admin_listen`) with SO_REUSEPORT, so several
    processes of one user serve the same port (`busway run --workers`); off by default, so a
    port already in use is an error rather than silently shared.
    `span_exporter` (an OpenTelemetry `SpanExporter`) receives the spans of `[tracing]`
    instead of OTLP/HTTP: the SDK's in-memory exporter in tests, or your own.
    """

    # Every public attribute is declared here, typed with public types only (re-exported from
    # `busway`): tests/test_package.py checks it, so an application can rely on each one.
    config: Config
    """The running config (replaced by a successful `reload`)."""
    serve_http: bool
    """False: do not bind `[http] listen`; the application mounts `asgi` in its own server."""
    registry: AdapterRegistry
    """The adapters this bus builds its sources and sinks with."""
    plan: Plan
    """The compiled routes and the built sources and sinks of `config`, in config order."""
    metrics: MetricsCollector
    """The counters of every running component (`metrics.stats`), a Prometheus collector."""
    metrics_registry: CollectorRegistry
    """The Prometheus registry `/metrics` serves."""
    nats_url: str | None
    """The NATS server busway connected to (the embedded one's URL when it runs one)."""
    http_port: int | None
    """The port `[http] listen` bound (the one picked for `:0`); None while not serving."""
    app: Starlette | None
    """busway's current HTTP app; None until the bus has started."""

    def __init__(
        self,
        config: Config,
        *,
        registry: AdapterRegistry | None = None,
        adapters: Iterable[Adapter[SourceConfig, SinkConfig]] = (),
        serve_http: bool = True,
        reuse_port: bool = False,
        span_exporter: Any = None,
    ) -> None:
        self.config = config
        self.serve_http = serve_http
        self._reuse_port = reuse_port
        self._asgi = DeferredApp()
        base = registry or default_registry()
        added = list(adapters)
        self.registry = base.with_adapters(*added) if added else base
        self.plan = build_plan(config, self.registry)
        self.metrics = MetricsCollector()
        self.metrics_registry = new_registry(self.metrics)
        self.nats_url: str | None = None
        self.http_port: int | None = None
        self.app: Starlette | None = None
        self._client: NatsClient | None = None
        self._js: JetStream | None = None
        self._tg: TaskGroup | None = None
        self._components: dict[tuple[str, str], _Running] = {}
        self._requester: Requester | None = None
        self._publisher: JetStreamPublisher | None = None
        self._audit: AuditTrail | None = None
        self._span_exporter = span_exporter
        self._spans: Spans | None = None
        self._state: Bucket | None = None
        self._refusals = WriteRefusals()
        self._pub_acks: PubAckWatch | None = None
        self._gate: IsolationGate | None = None
        self._ledger: AttemptLedger | None = None
        self._reload_lock = anyio.Lock()
        self._listener: Listener | None = None
        self._listener_done = anyio.Event()
        self._stop_requested = anyio.Event()
        self._embedded: EmbeddedNatsServer | None = None
        self._failure: BuswayError | None = None
        self._holder_id = new_holder_id()
        """This daemon's name in the leases it holds."""
        self._closing = False
        """True once busway closes its NATS connection itself (not a connection lost)."""

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        registry: AdapterRegistry | None = None,
        adapters: Iterable[Adapter[SourceConfig, SinkConfig]] = (),
    ) -> Bus:
        """A bus for the TOML config at `path`, with `adapters` added to `registry` (default:
        every installed adapter); ConfigError names file, key and line."""
        registry = registry or default_registry()
        added = list(adapters)
        if added:
            registry = registry.with_adapters(*added)
        config = load_config(
            path, source_types=registry.source_config, sink_types=registry.sink_config
        )
        try:
            return cls(config, registry=registry)
        except ConfigError as error:
            raise locate_in_file(error, path) from None

    @property
    def asgi(self) -> ASGIApp:
        """busway's HTTP app (sources, /metrics, /healthz, /readyz) for mounting in yours.

        Stable for the bus's lifetime: mount it before the bus starts; it answers 503 (with
        `Retry-After`) until the bus serves and again once it stops.
        """
        return self._asgi

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

    def health(self) -> dict[str, bool]:
        """Liveness checks by name: the embedded nats-server, when busway runs one."""
        return {} if self._embedded is None else {"embedded_nats": self._embedded.up}

    def readiness(self) -> dict[str, bool]:
        """Readiness checks by name: the NATS connection, JetStream taking writes, and every
        component (started, and neither stalled nor failing; see `busway._observe.readiness`)."""
        return {name: reason is None for name, reason in self.readiness_reasons().items()}

    def readiness_reasons(self) -> dict[str, str | None]:
        """Each readiness check and why it fails (None when it passes)."""
        checks: dict[str, str | None] = {
            "nats": None if self._client and self._client.is_connected else "not connected",
            "jetstream": self._refusals.reason(),
            "pub_acks": self._pub_acks.reason() if self._pub_acks else None,
        }
        for stats in self.metrics.stats:
            checks[f"{stats.kind}:{stats.name}"] = component_reason(stats)
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
            stack.enter_context(redaction(config.redaction))  # [redaction] what busway shows
            if self.serve_http and config.http.listen:
                stack.callback(self._bind_listener().close)
            auth = nats_auth(config.nats, config.resolve_path)
            servers = config.nats.servers
            embedded = None
            if servers is None:
                embedded = EmbeddedNatsServer(
                    with_resolved_paths(config.nats, config.resolve_path),
                    config.resolve_path(config.nats.data_dir),
                    permissions=busway_permissions(config),
                    resolve=config.resolve_path,
                )
                auth = embedded.client_auth(auth)
                await embedded.start()
                stack.push_async_callback(embedded.stop)
                self._embedded = embedded
                servers = [embedded.url]
            self.nats_url = servers[0]
            client = await connect(
                config.nats,
                servers,
                on_reconnected=self._on_reconnected,
                auth=auth,
                server_name=embedded.server_name if embedded is not None else None,
                on_closed=self._on_closed,
            )
            self._client = client
            stack.push_async_callback(self._close_client, client)
            check_replicas_possible(client, config)
            js = jetstream(client, window=config.nats.publish_window)
            self._js = js
            self._pub_acks = PubAckWatch(
                js, after=min(float(config.nats.ping_interval), float(config.nats.publish_timeout))
            )
            for stream in [*config.streams, *config.busway_streams]:
                await self._when_ready(f"stream {stream.name!r}", ensure_stream, js, stream)
            self._state = Bucket(
                await self._when_ready(
                    "the state bucket",
                    functools.partial(open_state_bucket, replicas=config.cluster.replicas),
                    js,
                    config.state_bucket,
                ),
                config.state_bucket,
            )
            self._requester = Requester(
                client, js, is_stored=self._is_stored, publish_timeout=config.nats.publish_timeout
            )
            self._publisher = JetStreamPublisher(
                js, timeout=config.nats.publish_timeout, refusals=self._refusals
            )
            self._audit = AuditTrail(js, config.audit) if config.audit.enabled else None
            if config.tracing.enabled:
                self._spans = _open_spans(config, self._span_exporter)
                stack.push_async_callback(anyio.to_thread.run_sync, self._spans.shutdown)
            # A crash kills every component at once: one gate for the whole process.
            self._gate = IsolationGate()
            # A short deadline: a failing message's nak waits for its ledger entry.
            self._ledger = AttemptLedger(
                js, config.state_bucket, timeout=min(2.0, float(config.nats.publish_timeout))
            )
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._sample_rates)
                if embedded is not None:
                    tg.start_soon(self._watch_embedded, embedded)
                tg.start_soon(self._ledger.run)
                await self._start_components(self.plan)
                self._serve_app()
                if self.serve_http and config.http.listen:
                    await self._start_listener(tg)
                for note in self.plan.cycles.notes:
                    logger.warning("%s", note)
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
                        await self._ledger.close(timeout=2.0)
                    self._asgi.app = None  # a mounted app answers 503 from now on
                    tg.cancel_scope.cancel()
            if self._failure is not None:
                raise self._failure

    async def status(self) -> StatusReport:
        """Per component: state, counters, rates, consumer backlog, circuit, last error.

        What `/status` serves (as `msgspec.to_builtins(report)`) and `busway status` shows.
        Backlog figures come from JetStream (`num_pending`: not yet delivered;
        `num_ack_pending`: delivered, not acked).
        """
        components = [
            await self._component_status(kind, name, running)
            for (kind, name), running in list(self._components.items())
        ]
        reasons = self.readiness_reasons()
        return StatusReport(
            status="ready" if not any(reasons.values()) else "not ready",
            nats=reasons["nats"] is None,
            not_ready={name: reason for name, reason in reasons.items() if reason},
            components=components,
        )

    async def _component_status(self, kind: str, name: str, running: _Running) -> ComponentStatus:
        stats = running.stats
        consumer_error: str | None = None
        pending = ack_pending = redelivered = None
        worker = running.worker
        if isinstance(worker, ConsumerComponent) and self._js is not None:
            try:
                state = await consumer_state(self._js, worker.stream, worker.durable)
            except BuswayError as exc:
                consumer_error = str(exc) or type(exc).__name__
            else:
                pending, ack_pending = state.pending, state.ack_pending
                redelivered = state.redelivered
        return ComponentStatus(
            kind=stats.kind,
            name=name,
            ready=component_reason(stats) is None,
            received=stats.received,
            published=stats.published,
            filtered=stats.filtered,
            dead_lettered=stats.dead_lettered,
            retried=stats.retried,
            in_flight=stats.in_flight,
            rate_in=round(stats.rate_in, 1),
            rate_out=round(stats.rate_out, 1),
            errors=dict(stats.errors),
            last_error=stats.last_error or None,
            last_error_at=_iso(stats.last_error_at),
            circuit=STATE_NAMES[stats.circuit] if kind == "sink" else None,
            consumer_error=consumer_error,
            pending=pending,
            ack_pending=ack_pending,
            redelivered=redelivered,
        )

    async def _status_json(self) -> dict[str, Any]:
        """`status()` as the `/status` JSON object."""
        report: dict[str, Any] = msgspec.to_builtins(await self.status())
        return report

    async def _sample_rates(self, interval: float = 5.0) -> None:
        """Every `interval`, turn counter deltas into per-second rates for `status()`, and
        sample each consumer's backlog for `busway_consumer_pending`."""
        last: dict[int, tuple[float, int, int]] = {}
        while True:
            await anyio.sleep(interval)
            now = anyio.current_time()
            for running in list(self._components.values()):
                stats = running.stats
                worker = running.worker
                if worker is not None:
                    stats.max_in_flight = worker.max_in_flight
                if isinstance(worker, ConsumerComponent) and self._js is not None:
                    with contextlib.suppress(BuswayError):  # a lost sample is not an error
                        state = await consumer_state(self._js, worker.stream, worker.durable)
                        stats.pending = state.pending
                then, received, published = last.get(id(stats), (now - interval, 0, 0))
                elapsed = max(now - then, 1e-6)
                stats.rate_in = (stats.received - received) / elapsed
                stats.rate_out = (stats.published - published) / elapsed
                last[id(stats)] = (now, stats.received, stats.published)

    async def reload(self, config: Config) -> ReloadReport:
        """Switch the running bus to `config`, component by component.

        The new config is compiled first: a ConfigError leaves everything running as it was.
        New streams are created; removed routes, sinks and sources drain and stop; new ones
        start; changed ones drain, then restart with the new settings on the same durable
        consumer, so what the old one had not acked is redelivered to the new one (and its
        outputs' message ids make a reprocessed message harmless). Settings of the connection
        itself (`[nats]`, `[http]`, dead letters, state bucket), `[redaction]`, `[audit]` and
        `[tracing]` need a restart:
        ConfigError.
        """
        async with self._reload_lock:
            for section in (
                "nats",
                "cluster",
                "http",
                "dead_letter",
                "state_bucket",
                "redaction",
                "audit",
                "tracing",
            ):
                if getattr(config, section) != getattr(self.config, section):
                    raise ConfigError(
                        f"[{section}] changed: that needs a restart, not a reload",
                        path=f"$.{section}",
                    )
            plan = build_plan(config, self.registry)
            assert self._js is not None
            for stream in config.streams:
                await ensure_stream(self._js, stream)
            old_plan = self.plan
            report = ReloadReport(notes=shared_consumer_notes(self.config, config))
            for note in report.notes:
                logger.warning("%s", note)
            self.config, self.plan = config, plan
            wanted = {key: component for key, component in _components(plan)}
            for key, component in _components(old_plan):
                if wanted.get(key, (None,))[0] != component[0]:
                    await self._stop_component(key)
                    (report.changed if key in wanted else report.removed).append(_label(key))
            running_before = {key for key, _ in _components(old_plan)}
            report.added = [_label(key) for key in wanted if key not in running_before]
            await self._start_components(plan)
            self._serve_app()
            logger.info("reloaded: %s", report)
            return report

    async def _start_components(self, plan: Plan) -> None:
        """Start every component of `plan` not yet running: sinks, routes, then sources."""
        assert self._tg is not None
        for sink_config, sink in plan.sinks:
            if ("sink", sink_config.name) not in self._components:
                await self._start_sink(sink_config, sink)
        for route_config, route in plan.routes:
            if ("route", route_config.name) not in self._components:
                await self._start_route(route_config, route)
        for source_config, source in plan.sources:
            if ("source", source_config.name) not in self._components:
                await self._start_source(source_config, source)

    async def _start_sink(self, sink_config: SinkConfig, sink: Sink) -> None:
        stats = ComponentStats(sink_config.name, "sink")
        worker = SinkWorker(
            sink=sink,
            batch_size=sink_config.batch_size,
            batch_wait=sink_config.batch_wait,
            circuit=sink_config.circuit,
            stats=stats,
            **self._consumer_settings(sink_config, "sink"),
        )
        await self._supervise(("sink", sink_config.name), sink_config, stats, worker.run, worker)

    async def _start_route(self, route_config: RouteConfig, route: Route) -> None:
        stats = ComponentStats(route_config.name, "route")
        if route_config.partitioned:
            await self._start_partitioned_route(route_config, route, stats)
            return
        worker = self._route_worker(route_config, route, stats)
        await self._supervise(("route", route_config.name), route_config, stats, worker.run, worker)

    def _route_worker(
        self, route_config: RouteConfig, route: Route, stats: ComponentStats, partition: int = -1
    ) -> RouteWorker:
        """The worker of a route, or of its partition `partition` (a consumer of its own)."""
        assert self._js is not None
        assert self._requester is not None
        settings = self._consumer_settings(route_config, "route")
        if partition >= 0:
            settings["durable"] += f"-p{partition}"
            settings["filter_subject"] = partition_filter(route_config.from_, partition)
        return RouteWorker(
            route=route,
            services=NatsRouteServices(
                self._js, self._requester, replicas=self.config.cluster.replicas
            ),
            state_bucket=self.config.state_bucket,
            state_scope=f"{route_config.name}.p{partition}" if partition >= 0 else None,
            hop_limit=self.plan.hop_limit(route_config),
            stats=stats,
            **settings,
        )

    async def _start_partitioned_route(
        self, route_config: RouteConfig, route: Route, stats: ComponentStats
    ) -> None:
        """A route read one consumer per partition, partitions shared out between daemons."""
        assert self._state is not None
        stream = self.config.consumed_stream(route_config)
        assert stream is not None
        assert stream.partition is not None
        partitioned = PartitionedRoute(
            name=route_config.name,
            count=stream.partition.count,
            ttl=float(route_config.partition_lease_ttl),
            holder=self._holder_id,
            bucket=self._state,
            make_worker=functools.partial(self._route_worker, route_config, route, stats),
            stats=stats,
            timeout=float(self.config.nats.publish_timeout),
            drain_timeout=float(self.config.shutdown_timeout),
        )
        await self._supervise(
            ("route", route_config.name), route_config, stats, partitioned.run, partitioned
        )

    async def _start_source(self, source_config: SourceConfig, source: Source) -> None:
        assert self._js is not None
        assert self._publisher is not None
        if self._state is None:
            self._state = await open_state(self._js, self.config.state_bucket)
        stats = ComponentStats(source_config.name, "source")
        http_routes: list[BaseRoute] | None = (
            [] if self.config.http.listen or not self.serve_http else None
        )
        publisher: Publisher = self._publisher
        if self._audit is not None or self._spans is not None:  # [audit], [tracing]
            publisher = ObservedPublisher(
                publisher,
                source=source_config.name,
                stats=stats,
                audit=self._audit,
                spans=self._spans,
                dead_letter_prefix=self.config.dead_letter.subject_prefix,
            )
        context = SourceContext(
            name=source_config.name,
            publisher=publisher,
            state=KeyValueState(self._state, f"{source_config.name}."),
            stats=stats,
            logger=logging.getLogger(f"busway.source.{source_config.name}"),
            dead_letter_subject=f"{self.config.dead_letter.subject_prefix}.{source_config.name}",
            http_routes=http_routes,
            requester=self._requester,
            open_dedup_store=functools.partial(self._open_dedup_store, source_config),
            open_lease=functools.partial(self._open_lease, source_config.name),
        )
        if self._audit is not None:  # [audit] request-reply requests are ingress too
            context.on_requested = functools.partial(
                self._audit.requested, source_config.name, stats=stats
            )

        async def run(*, task_status: TaskStatus[None]) -> None:
            await run_source(source, context, task_status=task_status, on_restarted=self._serve_app)

        await self._supervise(
            ("source", source_config.name), source_config, stats, run, None, http_routes
        )
        stats.ready = True

    def _open_lease(self, source: str, name: str, ttl: float) -> AbstractAsyncContextManager[Lease]:
        """`source`'s lease `name` in the state bucket (see `_nats/lease.py`)."""
        assert self._state is not None
        keeper = LeaseKeeper(
            self._state,
            lease_key(source, name),
            ttl=ttl,
            holder=self._holder_id,
            log=logging.getLogger(f"busway.source.{source}"),
            timeout=float(self.config.nats.publish_timeout),
        )
        return keeper.hold()

    async def _open_dedup_store(self, source: SourceConfig) -> DedupStore:
        """`source`'s dedup bucket, scoped like JetStream's dedup: by stream and source."""
        assert self._js is not None
        pattern = ".".join("*" if "{" in token else token for token in source.subject.split("."))
        stream = self.config.stream_for(pattern)
        streams = [stream] if stream is not None else self.config.streams
        name = (
            f"busway_dedup_{stream.name}_{source.name}" if stream else f"busway_dedup_{source.name}"
        )
        return await self._when_ready(
            f"the dedup bucket {name!r}",
            functools.partial(
                dedup_store,
                timeout=self.config.nats.publish_timeout,
                replicas=self.config.cluster.replicas,
            ),
            self._js,
            name,
            [s.name for s in streams],
        )

    async def _when_ready(self, what: str, declare: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """`declare(*args)`, retried while JetStream is not ready (`[cluster] startup_timeout`)."""
        return await until_ready(
            what,
            functools.partial(declare, *args),
            timeout=float(self.config.cluster.startup_timeout),
            client=self._client,
            replicas=self.config.cluster.replicas,
        )

    async def _supervise(
        self,
        key: tuple[str, str],
        config: object,
        stats: ComponentStats,
        run: Callable[..., Awaitable[None]],
        worker: ConsumerComponent | PartitionedRoute | None,
        http_routes: list[BaseRoute] | None = None,
    ) -> None:
        """Run one component in its own cancel scope, so a reload can stop it alone."""
        assert self._tg is not None
        running = _Running(config=config, stats=stats, worker=worker, http_routes=http_routes)
        self._components[key] = running
        self.metrics.add(stats)

        async def supervised(*, task_status: TaskStatus[None]) -> None:
            try:
                with running.scope:
                    await run(task_status=task_status)
            finally:
                running.done.set()

        try:
            await self._tg.start(supervised)
        except BaseException:
            self._components.pop(key, None)
            self.metrics.remove(stats)
            raise

    async def _stop_component(self, key: tuple[str, str]) -> None:
        """Drain one component (bounded by `shutdown_timeout`), then cancel and forget it."""
        running = self._components.pop(key)
        if running.worker is not None:
            await running.worker.drain(float(self.config.shutdown_timeout))
        running.scope.cancel()
        await running.done.wait()
        self.metrics.remove(running.stats)
        logger.info("%s %s stopped", *key)

    def _serve_app(self) -> None:
        """(Re)build the HTTP app from the running sources' routes and serve it."""
        routes: list[BaseRoute] = []
        serving = False
        for running in self._components.values():
            if running.http_routes is not None:
                serving = True
                routes.extend(running.http_routes)
        if not serving and not (self.serve_http and self.config.http.listen):
            return
        self.app = build_app(
            routes,
            registry=self.metrics_registry,
            readiness=self.readiness_reasons,
            status=self._status_json,
            health=self.health,
        )
        self._asgi.app = self.app

    @property
    def _workers(self) -> list[ConsumerComponent | PartitionedRoute]:
        return [r.worker for r in self._components.values() if r.worker is not None]

    def _is_stored(self, subject: str) -> bool:
        return self.config.stream_for(subject) is not None

    def _consumer_settings(self, component: RouteConfig | SinkConfig, kind: str) -> dict[str, Any]:
        stream = component.stream
        if stream is None:
            captured = self.config.stream_for(component.from_)
            assert captured is not None  # the config check guarantees a capturing stream
            stream = captured.name
        assert self._client is not None
        assert self._js is not None
        assert self._gate is not None
        assert self._ledger is not None
        consumed = self.config.consumed_stream(component)
        return {
            "partitioned_stream": consumed is not None and consumed.partition is not None,
            "client": self._client,
            "js": self._js,
            "gate": self._gate,
            "ledger": self._ledger,
            "publish_timeout": self.config.nats.publish_timeout,
            "stream": stream,
            # On a partitioned stream the stored subjects end in the partition token.
            "filter_subject": consumer_filter(component.from_, consumed),
            "durable": f"busway-{kind}-{component.name}",
            "max_in_flight": component.max_in_flight,
            "ack_wait": float(component.ack_wait),
            "retry": component.retry,
            "dead_letter_subject": self.config.dead_letter_subject(component),
            "refusals": self._refusals,
            "start": component.start,
            "startup_timeout": float(self.config.cluster.startup_timeout),
            "audit": self._audit,
            "spans": self._spans,
        }

    def _bind_listener(self) -> Listener:
        """The HTTP listener with its port taken and its certificate loaded (StartupError)."""
        http = self.config.http
        assert http.listen
        listener = Listener(
            self.asgi,
            http.listen,
            tls_cert=self.config.resolve_path(http.tls_cert) if http.tls_cert else None,
            tls_key=self.config.resolve_path(http.tls_key) if http.tls_key else None,
            settings=http,
            registry=self.metrics_registry,
            reuse_port=self._reuse_port,
        )
        listener.bind()
        self._listener = listener
        return listener

    async def _start_listener(self, tg: TaskGroup) -> None:
        listener = self._listener
        assert listener is not None

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
        for (kind, _), running in self._components.items():
            if kind == "source":
                running.scope.cancel()

    async def _watch_embedded(self, embedded: EmbeddedNatsServer) -> None:
        """Keep the embedded server running; stop the bus if it cannot be."""
        try:
            await embedded.watch()
        except BuswayError as exc:
            self._fail(exc)

    def _fail(self, error: BuswayError) -> None:
        """Stop the bus because of `error`; leaving its block raises it."""
        if self._failure is None:
            self._failure = error
            logger.error("stopping: %s", error)
        self.stop()

    async def _on_reconnected(self) -> None:
        embedded, client = self._embedded, self._client
        if embedded is not None and client is not None:
            name = server_name_of(client)
            if name is not None and name != embedded.server_name:  # None: nats-py cannot say
                # Another server took the port while ours was down: never talk to it.
                self._fail(
                    StartupError(
                        f"reconnected to a NATS server named {name!r} on {embedded.url}, not "
                        f"the embedded server busway started ({embedded.server_name!r}): "
                        "another server took [nats] listen"
                    )
                )
                if self._tg is not None:
                    self._tg.start_soon(self._close_client, client)
                return
        if self._js is not None:
            fail_unconfirmed(self._js)
        for worker in self._workers:
            await worker.reset_pull()

    async def _on_closed(self) -> None:
        """The connection closed for good: when busway did not close it, stop the bus."""
        if not self._closing:
            self._fail(
                StartupError(
                    "the NATS connection is closed for good: every reconnection attempt failed "
                    "([nats] max_reconnect_attempts); restart busway once NATS is reachable"
                )
            )

    async def _close_client(self, client: NatsClient) -> None:
        self._closing = True
        await close_connection(client)


def _open_spans(config: Config, exporter: Any) -> Spans:
    """`[tracing]`'s spans; imports OpenTelemetry (only now: tracing is on)."""
    try:
        from busway._observe.spans import open_spans
    except ImportError as exc:
        raise StartupError(
            f"[tracing] enabled needs OpenTelemetry ({exc.name} is missing): "
            "pip install 'busway[tracing]'"
        ) from None
    return open_spans(config.tracing, exporter)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions inside `group` and its nested groups."""
    leaves: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            leaves.extend(_leaves(exc))
        else:
            leaves.append(exc)
    return leaves


@dataclass(eq=False)
class _Running:
    """One running component: what a reload needs to compare it, drain it and cancel it."""

    config: object
    stats: ComponentStats
    worker: ConsumerComponent | PartitionedRoute | None
    """What drains; a partitioned route's partitions are consumers of their own."""
    http_routes: list[BaseRoute] | None
    scope: anyio.CancelScope = field(default_factory=anyio.CancelScope)
    done: anyio.Event = field(default_factory=anyio.Event)


@dataclass
class ReloadReport:
    """What a reload did, by `kind:name`."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the operator should know: consumers the change applies to on every daemon."""

    def __str__(self) -> str:
        parts = [
            f"{what}: {', '.join(names)}"
            for what, names in (
                ("added", self.added),
                ("removed", self.removed),
                ("changed", self.changed),
            )
            if names
        ]
        return "; ".join([*parts, *self.notes]) or "nothing changed"


def _components(plan: Plan) -> list[tuple[tuple[str, str], tuple[object, object]]]:
    """`((kind, name), (config, built component))` of every component in `plan`."""

    # The partitions of the stream a consumer reads decide its consumers' filters (and a
    # partitioned route's consumers): a reload that changes them restarts it.
    def layout(component: RouteConfig | SinkConfig) -> object:
        stream = plan.config.consumed_stream(component)
        return stream.partition if stream is not None else None

    return [
        *((("sink", c.name), ((c, layout(c)), s)) for c, s in plan.sinks),
        # A route's hop limit is part of what it runs with: a route that a reload puts into a
        # cycle (or takes out of one) restarts, like a route whose own settings changed.
        *((("route", c.name), ((c, plan.hop_limit(c), layout(c)), r)) for c, r in plan.routes),
        *((("source", c.name), (c, s)) for c, s in plan.sources),
    ]


def _iso(timestamp: float) -> str | None:
    if not timestamp:
        return None
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()


def _label(key: tuple[str, str]) -> str:
    return f"{key[0]}:{key[1]}"
