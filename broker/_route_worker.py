"""Runs one route: pull → `CompiledRoute.apply` → publish to every `to` → ack after all PubAcks.

The hot path is two tasks. The pull callback applies the route and hands each output to
`publish_async` without waiting (the publish window bounds how many are unconfirmed); the
settler walks inputs in arrival order, waits for each one's PubAcks and acks it. JetStream
answers PubAcks in order, so waiting in order costs nothing and keeps the code simple.

Every output carries `Nats-Msg-Id = <stream>:<sequence>:<route>:<index>`: a redelivered input
republishes the same ids, and the output stream drops the copies (within its duplicate window).
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import anyio
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import PubAck

from busway._consumer import ConsumerComponent
from busway._delivery import ACK, passthrough_headers
from busway._jetstream import await_pub_ack, publish_error
from busway.routers.context import MessageContext
from busway.routers.route import CompiledRoute, RoutingError

__all__ = ["RouteWorker"]


# An input waiting for its outputs' PubAcks: (message, futures, sequence, attempt, received).
# A plain tuple: one is built per message, and a tuple is the cheapest record to build.
_Pending = tuple[Msg, list[asyncio.Future[PubAck]], str, int, float]


class RouteWorker(ConsumerComponent):
    """One route's consumer, publisher and settler."""

    def __init__(self, *, route: CompiledRoute, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.route = route
        self._id_prefix = f"{self.stream}:"
        self._id_suffix = f":{route.name}:"
        self._targets = tuple((subject, str(index)) for index, subject in enumerate(route.to))
        self._pending: collections.deque[_Pending] = collections.deque()
        self._wake = asyncio.Event()

    async def start_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """Start the in-order settler."""
        tg.start_soon(self._settle_in_order)

    async def handle(self, message: Msg, sequence: str, attempt: int) -> None:
        """Apply the route and publish its outputs; the settler acks once they are stored."""
        received = time.monotonic()
        context = (
            MessageContext(message.subject, message.headers, self.stream, int(sequence), attempt)
            if self.route.needs_context
            else None
        )
        try:
            body = self.route.apply(message.data, context)
        except RoutingError as exc:
            extra = {"Busway-Expression": exc.expression} if exc.expression else None
            await self.dead_letter(
                message, sequence, attempt, reason=exc.kind, error=str(exc), extra_headers=extra
            )
            return
        if body is None:
            self.stats.filtered += 1
            await self.settle(message, ACK)
            return
        inherited = message.headers
        id_base = self._id_prefix + sequence + self._id_suffix
        publish = self.js.publish_async
        futures = []
        for subject, index in self._targets:
            headers = passthrough_headers(inherited) if inherited else {}
            headers["Nats-Msg-Id"] = id_base + index
            try:
                futures.append(await publish(subject, body, headers=headers))
            except (TimeoutError, nats.errors.Error) as exc:
                failed: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
                failed.set_exception(publish_error(exc, subject))
                futures.append(failed)
        self._pending.append((message, futures, sequence, attempt, received))
        self._wake.set()

    async def _settle_in_order(self) -> None:
        pending = self._pending
        wake = self._wake
        stats = self.stats
        observe = stats.latency.observe
        to = self.route.to
        timeout = self.publish_timeout
        while True:
            if not pending:
                wake.clear()
                await wake.wait()
                continue
            message, futures, sequence, attempt, received = pending.popleft()
            error = None
            for index, future in enumerate(futures):
                try:
                    if future.done() and not future.cancelled() and future.exception() is None:
                        continue
                    await await_pub_ack(future, to[index], timeout)
                except Exception as exc:
                    error = exc
                    break
            if error is None:
                stats.published += len(futures)
                observe(time.monotonic() - received)
                if attempt > 1:
                    self.forget_error(sequence)
                await self.settle(message, ACK)
            else:
                await self.retry_later(message, sequence, attempt, str(error), reason="publish")
