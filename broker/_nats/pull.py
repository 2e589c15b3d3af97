"""Continuous pull from a durable JetStream consumer, bounded by the caller's free capacity.

nats-py's `fetch()` can stall for its whole timeout on an orphaned pull request (nats.py 933,
986) and measured 1.6x slower than keeping requests outstanding. So busway keeps its own
`$JS.API.CONSUMER.MSG.NEXT` requests on one inbox:

* at most `capacity` messages are ever requested or held (`in_flight + requested <= capacity`),
  so a slow stage pushes back to the consumer instead of growing a queue;
* a new request goes out as soon as half a batch of room is free, so work never waits on a
  request round trip or a timeout;
* status messages settle the books: 408 (request expired) and 409 (e.g. max ack pending
  exceeded, consumer changed) say how many of a request will never come;
* after a reconnect or a silence longer than a request's lifetime the books are reset and
  requests re-issued, because a restarted server forgets them (nats.py 504).

nats-py calls `_on_message` from its own subscription task. That callback only keeps the
books, wraps the message in a `Delivery` (which carries its own ack) and queues it; busway's
delivery task (in the component's task group, started by `run`) hands it to the handler. So
per-message work never runs in a task nats-py owns, and an error in it can never end up in
nats-py's error callback as a "NATS connection error".
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable

import anyio
import nats.errors
import orjson
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from busway._delivery.contract import delivery_of
from busway._delivery.delivery import Delivery, Settler
from busway._observe.metrics import ComponentStats

__all__ = ["ContinuousPull"]

logger = logging.getLogger("busway.pull")

Handler = Callable[[Delivery], Awaitable[None]]
ErrorHandler = Callable[[Delivery, Exception], Awaitable[None]]


class ContinuousPull:
    """Feeds deliveries of one durable pull consumer to `handler`, never more than `capacity`.

    Each message becomes a `Delivery` settled through `owner`. The handler owns each ack; the
    owner calls `forget(reply)` and then `make_room()` once
    per message it has acked, naked or terminated, which frees room for the next request.
    `held` is the slot book: one entry per message taken and not yet settled, so a second
    settle of the same delivery is refused rather than freeing a slot that is still taken. Its
    size is `stats.in_flight`, the exported gauge. An exception that escapes the handler goes
    to `on_error` with its message (which must settle it), never to nats-py.
    """

    def __init__(
        self,
        client: NatsClient,
        *,
        stream: str,
        durable: str,
        capacity: int,
        owner: Settler,
        handler: Handler,
        on_error: ErrorHandler,
        stats: ComponentStats,
        batch: int = 256,
        expires: float = 1.0,
    ) -> None:
        self._client = client
        self._stream = stream
        self._owner = owner
        self.send = client.publish
        """nats-py's core publish, for ack payloads and `+WPI` (no wrapper: it runs once per
        message). A failure means the connection is going away: the ack is lost, JetStream
        redelivers after `ack_wait`, and the outputs' message ids make that harmless."""
        self._subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._capacity = capacity
        self._handler = handler
        self._on_error = on_error
        self._batch = max(1, min(batch, capacity))
        self._low_water = max(1, self._batch // 2)
        self._expires = expires
        self._expires_ns = int(expires * 1e9)
        self._inbox = client.new_inbox()
        self._subscription: Subscription | None = None
        self._requested = 0
        self._stats = stats
        self._drained: anyio.Event | None = None
        self._pulling = False
        self._last_heard = time.monotonic()
        self._retry_at = 0.0
        # Messages taken from nats-py's callback, waiting for the delivery task. Bounded by
        # the books: no more is ever requested than `capacity` minus what is held, so it holds
        # at most `capacity` (twice that for a moment after a reset re-requests).
        self._queue: collections.deque[Delivery] = collections.deque()
        self._wake = asyncio.Event()
        self.released = 0
        """Messages settled so far: a stalled component is one whose count stops moving."""
        self.held: dict[str, int] = {}
        """Reply subject of every message taken and not released → `tick` when it was taken or
        last kept alive (see `ConsumerComponent.keep_alive`)."""
        self.tick = 0

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, start delivering, issue the first request and watch for lost requests,
        until cancelled."""
        self._subscription = await self._client.subscribe(
            self._inbox, cb=self._on_message, pending_msgs_limit=self._capacity * 2 + 1024
        )
        self._pulling = True
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._deliver)
                await self._maybe_request()
                task_status.started()
                while True:
                    await anyio.sleep(min(1.0, self._expires / 2))
                    await self._watchdog()
        finally:
            self._pulling = False
            with anyio.CancelScope(shield=True):
                subscription, self._subscription = self._subscription, None
                if subscription is not None and not self._client.is_closed:
                    await subscription.unsubscribe()

    async def drain(self) -> None:
        """Stop requesting; return once nothing is held and no request is outstanding.

        JetStream cannot cancel a pull request, so messages keep arriving until every
        outstanding one is filled or expires (`expires`, 1 s by default). The handler settles
        those too (the engine naks them at once, for another daemon or the next start);
        unsubscribing earlier would leave them un-acked until `ack_wait`.
        """
        self._pulling = False
        while self.held or self._requested:
            self._drained = anyio.Event()
            await self._drained.wait()

    def _notify_drained(self) -> None:
        # `held`, not the stats' gauge: the partitions of a route share one stats object.
        if self._drained is not None and not (self.held or self._requested):
            self._drained.set()

    def forget(self, reply: str) -> bool:
        """The message answering on `reply` is being settled: free its slot. False (and
        nothing freed) if it was not held, i.e. it was settled before.

        Synchronous, so two settles of one delivery cannot both pass; `make_room` after the
        ack is sent then asks for more."""
        if self.held.pop(reply, None) is None:
            return False
        self._stats.in_flight -= 1
        self.released += 1
        return True

    async def make_room(self) -> None:
        """After a `forget` (and its ack): request more, or tell a drain we may be done."""
        if not self._pulling:
            self._notify_drained()
        elif self._requested < self._low_water:
            # While half a batch is still requested, messages keep coming: no request needed.
            await self._maybe_request()

    def pause_until(self, deadline: float) -> None:
        """Issue no new pull requests before `deadline` (`time.monotonic()`); a sink whose
        circuit is open stops taking work this way. Outstanding requests still deliver."""
        self._retry_at = max(self._retry_at, deadline)

    async def reset(self) -> None:
        """Forget outstanding requests (the server lost them: reconnect) and request anew."""
        self._requested = 0
        self._last_heard = time.monotonic()
        await self._maybe_request()

    async def _watchdog(self) -> None:
        silent_for = time.monotonic() - self._last_heard
        if self._requested and silent_for > self._expires * 1.5:
            logger.debug(
                "no answer to pull requests on %s for %.1fs: re-requesting",
                self._subject,
                silent_for,
            )
            await self.reset()
        elif not self._requested:
            await self._maybe_request()

    async def _maybe_request(self) -> None:
        if not self._pulling or self._client.is_closed or self._client.is_reconnecting:
            return
        free = self._capacity - len(self.held) - self._requested
        if free < self._low_water or time.monotonic() < self._retry_at:
            return
        batch = min(free, self._batch)
        self._requested += batch
        request = orjson.dumps({"batch": batch, "expires": self._expires_ns})
        try:
            await self._client.publish(self._subject, request, reply=self._inbox)
        except nats.errors.Error as exc:
            # The connection is going away: this request never left. The watchdog (or the
            # reset after the reconnect) asks again; the caller, often a settle, goes on.
            self._requested -= batch
            logger.debug("pull request on %s not sent: %s", self._subject, exc)

    async def _on_message(self, message: Msg) -> None:
        """nats-py's callback: keep the books and queue the delivery, nothing more."""
        self._last_heard = time.monotonic()
        headers = message.headers
        if headers and not message.data and "Status" in headers:
            await self._on_status(headers)
            return
        self._requested -= 1
        self._stats.in_flight += 1
        reply = message.reply
        self.held[reply] = self.tick
        sequence, attempt = delivery_of(reply)
        self._queue.append(
            Delivery(
                self._owner,
                message.subject,
                message.data,
                headers,
                reply,
                self._stream,
                sequence,
                attempt,
            )
        )
        self._wake.set()

    async def _deliver(self) -> None:
        """The delivery task: hand each queued message to the handler, in arrival order."""
        queue = self._queue
        wake = self._wake
        handler = self._handler
        while True:
            if not queue:
                wake.clear()
                await wake.wait()
                continue
            delivery = queue.popleft()
            try:
                await handler(delivery)
            except Exception as exc:
                await self._on_error(delivery, exc)
            if self._requested < self._low_water:
                await self._maybe_request()

    async def _on_status(self, headers: dict[str, str]) -> None:
        status = headers["Status"]
        if status == "100":  # idle heartbeat
            return
        pending = headers.get("Nats-Pending-Messages")
        self._requested = max(0, self._requested - int(pending)) if pending else 0
        if not self._pulling:
            self._notify_drained()
        if status == "409":
            # e.g. "Exceeded MaxAckPending" right after a restart, while the dead process's
            # deliveries still count against the limit: back off instead of spinning.
            logger.debug("pull on %s answered 409 %s", self._subject, headers.get("Description"))
            self._retry_at = time.monotonic() + 0.25
        await self._maybe_request()
