"""The database source: run a poller (incremental or outbox) until cancelled, riding out outages.

A poll that fills its batch is followed at once by the next; otherwise the source sleeps for
`interval`, or less when a wake-up arrives (PostgreSQL LISTEN/NOTIFY): the notification makes
it fast, the interval makes it safe. Failures (database down, JetStream not confirming) are
logged and retried with exponential back-off; nothing is committed or advanced meanwhile.

An incremental source polls only while this daemon holds the source's lease (see
`SourceContext.lease`): with several daemons on one config, one polls and the others stand by,
and one of them takes over within `1.5 * lease_ttl` when the holder dies. Outbox sources
need no lease: daemons claim rows side by side (`SKIP LOCKED`, or SQLite's one writer).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from busway import ConfigError, DeliveryError, Source, SourceContext
from busway.adapters.sql._config import SqlSourceConfig
from busway.adapters.sql._database import Database
from busway.adapters.sql._outbox import OutboxClaimer
from busway.adapters.sql._poller import IncrementalPoller
from busway.adapters.sql._watermark import FencedOut

__all__ = ["Listener", "SqlSource"]

Listener = Callable[[Callable[[], None]], Coroutine[Any, Any, None]]
"""Runs until cancelled, calling the given function whenever new rows may be waiting."""

_MAX_BACKOFF = 30.0


class _Poller(Protocol):
    def lead(self, fence: int) -> None: ...

    async def load(self, context: SourceContext) -> None: ...

    async def poll(self, context: SourceContext) -> int: ...


class SqlSource(Source):
    """Publishes a table's new rows, or an outbox's rows, into JetStream."""

    def __init__(
        self, config: SqlSourceConfig, database: Database, *, listener: Listener | None = None
    ) -> None:
        self.config = config
        self.database = database
        self._listener = listener
        try:
            self._poller: _Poller = (
                IncrementalPoller(config, database)
                if config.mode == "incremental"
                else OutboxClaimer(config, database)
            )
        except ValueError as exc:  # a subject template that cannot work
            raise ConfigError(str(exc), path="$.subject") from None
        self._wake = anyio.Event()

    def wake(self) -> None:
        """Poll now instead of at the end of the interval."""
        self._wake.set()

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        """Load the watermark, then poll until cancelled (incremental: while leader)."""
        leased = self.config.mode == "incremental"
        try:
            await self.database.open()
        except DeliveryError as exc:
            context.logger.warning("database not reachable yet, will retry: %s", exc)
        try:
            if not leased:
                await self._poller.load(context)
            async with anyio.create_task_group() as tg:
                if self._listener is not None:
                    tg.start_soon(self._listener, self.wake)
                task_status.started()
                if leased:
                    await self._lead_forever(context)
                else:
                    await self._poll_forever(context)
        finally:
            with anyio.move_on_after(5, shield=True):
                await self.database.close()

    async def _lead_forever(self, context: SourceContext) -> None:
        """Win the lease, poll while holding it; when it is lost, stand by and try again."""
        while True:
            try:
                async with context.lease(ttl=float(self.config.lease_ttl)) as lease:
                    self._poller.lead(lease.token)
                    await self._poll_forever(context)
            except FencedOut as exc:
                context.logger.warning("stopped polling: %s", exc)

    async def _poll_forever(self, context: SourceContext) -> None:
        interval = float(self.config.interval)
        backoff = 0.0
        while True:
            try:
                count = await self._poller.poll(context)
            except FencedOut:
                raise  # not a failure to retry: another daemon polls now
            except Exception as exc:  # a source must outlive any one failure
                backoff = min(_MAX_BACKOFF, max(0.2, backoff * 2))
                context.stats.ready = False
                expected = isinstance(exc, DeliveryError)
                context.stats.count_error("retryable" if expected else "source_error")
                log = context.logger.warning if expected else context.logger.exception
                log("poll failed, retrying in %.1fs: %s", backoff, exc)
                await anyio.sleep(backoff)
                continue
            if backoff:
                context.logger.info("polling works again")
            backoff = 0.0
            context.stats.ready = True
            if count >= self.config.batch_size:
                await anyio.lowlevel.checkpoint()  # more rows wait: poll again after others ran
                continue
            with anyio.move_on_after(interval):
                await self._wake.wait()
            self._wake = anyio.Event()
