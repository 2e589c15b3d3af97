"""Runs one sink: pull → batch → `Sink.write` → ack the batch, or retry / dead-letter each.

Batches form from what has already arrived: the batcher takes everything queued (up to
`batch_size`) and, while the batch is not full, waits at most `batch_wait` for more. A sink
that fsyncs or commits per batch thus pays once per batch under load and adds at most
`batch_wait` of latency when traffic is light.

An outage does not cost attempts. Failures while the circuit is closed are real attempts
(naked with back-off, dead-lettered after `max_attempts`); the delivery whose failure opens the
circuit, and every failed probe after it, keep their messages in memory instead (kept alive
with `+WPI`, so JetStream neither redelivers them nor counts a delivery) until a probe
succeeds and they are delivered. Each outage thus costs a message at most
`circuit.failures - 1` attempts, the failures before busway concluded the peer is down.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from busway._components import Message, Sink
from busway._config.model import CircuitConfig
from busway._delivery.consumer import ConsumerComponent
from busway._delivery.contract import ACK, DRAIN_NAK, REPLAY_MSG_ID_HEADER
from busway._delivery.delivery import Delivery
from busway._egress.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from busway._errors import BatchError, PermanentError, RetryableError

__all__ = ["SinkWorker"]

_Entry = tuple[Delivery, Message, float]


class SinkWorker(ConsumerComponent):
    """One sink's consumer, batcher and settler."""

    def __init__(
        self,
        *,
        sink: Sink,
        batch_size: int,
        batch_wait: float,
        circuit: CircuitConfig,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.sink = sink
        self.batch_size = batch_size
        self.batch_wait = batch_wait
        self.breaker = CircuitBreaker(circuit.failures, float(circuit.cool_down))
        # Room for every message the pull loop may hold: it never requests more than
        # `max_in_flight`, twice that for a moment after a reconnect re-requests.
        self._queue_in: MemoryObjectSendStream[_Entry]
        self._queue_out: MemoryObjectReceiveStream[_Entry]
        self._queue_in, self._queue_out = anyio.create_memory_object_stream(2 * self.max_in_flight)
        self._stopped = anyio.Event()

    async def start_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """Open the sink and start the batcher."""
        try:
            await self.sink.open()
        except BaseException:
            # The batcher, which closes the queue, never runs: close it here.
            self._queue_in.close()
            self._queue_out.close()
            raise
        tg.start_soon(self._write_batches)

    async def drain(self, timeout: float) -> bool:
        """Stop pulling; messages waiting on an open circuit are handed back at once."""
        self.stopping = True
        self._stopped.set()
        return await super().drain(timeout)

    async def handle(self, message: Delivery) -> None:
        """Queue `message` for the batcher (waits only if the queue is full, which the pull's
        bounds make all but impossible)."""
        headers = message.headers or {}
        sequence = message.sequence
        delivery = Message(
            subject=message.subject,
            data=message.data,
            headers=headers,
            # A replayed dead letter keeps the original's identity (the partner's idempotency key).
            id=headers.get(REPLAY_MSG_ID_HEADER)
            or headers.get("Nats-Msg-Id")
            or f"{self.stream}:{sequence}",
            stream=self.stream,
            sequence=int(sequence),
            attempt=message.attempt,
        )
        entry = (message, delivery, time.monotonic())
        try:
            self._queue_in.send_nowait(entry)
        except anyio.WouldBlock:
            await self._queue_in.send(entry)

    async def _write_batches(self) -> None:
        try:
            async for first in self._queue_out:
                batch = [first]
                self._fill(batch)
                if len(batch) < self.batch_size and self.batch_wait > 0:
                    with anyio.move_on_after(self.batch_wait):
                        while len(batch) < self.batch_size:
                            batch.append(await self._queue_out.receive())
                            self._fill(batch)
                try:
                    # [isolation] a suspect is written alone, in a batch of its own
                    for part in self.isolation.split(batch, _reply_of):
                        await self._deliver_through_breaker(part)
                except Exception as exc:
                    # A bug on the way: settle what is still held rather than lose the
                    # batcher (and with it every later message).
                    for message, _, _ in batch:
                        if not message.settled:
                            await self.fail_unexpected(message, exc, retry=True)
        finally:
            self._queue_in.close()
            self._queue_out.close()
            with anyio.CancelScope(shield=True):
                await self.sink.close()

    def _fill(self, batch: list[_Entry]) -> None:
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue_out.receive_nowait())
            except anyio.WouldBlock:
                return

    async def _deliver_through_breaker(self, batch: list[_Entry]) -> None:
        """Deliver `batch`, waiting out an open circuit and probing with one message.

        What an outage holds back stays in `batch` (see the module docstring); a failed probe
        goes to its end, so one message the peer always fails cannot keep the circuit open
        while the others would pass.
        """
        breaker = self.breaker
        while batch:
            if self.stopping and breaker.state != CLOSED:
                # Shutting down during an outage: hand the messages back to JetStream now
                # (not counted as an attempt beyond this delivery) instead of waiting.
                for message, _, _ in batch:
                    await self.settle(message, DRAIN_NAK)
                return
            wait = breaker.wait_time()
            if wait > 0:
                self.stats.circuit = OPEN
                with anyio.move_on_after(wait):
                    await self._stopped.wait()
                continue
            if breaker.state == HALF_OPEN:
                self.stats.circuit = HALF_OPEN
                probe, rest = batch[:1], batch[1:]
                batch = rest + await self._deliver(probe)
            else:
                batch = await self._deliver(batch)

    def _record(self, batch_size: int, failures: dict[int, BaseException]) -> bool:
        """Tell the breaker how the delivery went; open the circuit if it says so.

        True if the peer is now considered down (the circuit is not closed): the delivery's
        transient failures are then held for the circuit, not counted as attempts.
        """
        breaker = self.breaker
        transient = sum(not isinstance(f, PermanentError) for f in failures.values())
        if transient < batch_size:
            # Something got through, or the peer answered "permanent" (it is up): close.
            breaker.succeeded()
        elif breaker.failed():
            self.pull.pause_until(time.monotonic() + breaker.cool_down)
            self.logger.warning(
                "circuit open: %d consecutive failed deliveries; pausing for %.0fs "
                "(held messages wait; their attempts are not counted)",
                breaker.failures,
                breaker.cool_down,
            )
        self.stats.circuit = breaker.state
        self.stats.ready = self.sink.ready() and breaker.state != OPEN
        return breaker.state != CLOSED

    async def _deliver(self, batch: list[_Entry]) -> list[_Entry]:
        """Write `batch` and settle each message; returns those an outage holds back."""
        spans = self.spans  # [tracing] a write span per sampled message
        writes = spans.sink_writes(self.stats.name, batch) if spans is not None else None
        try:  # [isolation] guarded: alone if a suspect
            await self.isolation.guard(
                batch[0][0].reply, self.sink.write, [delivery for _, delivery, _ in batch]
            )
        except BatchError as exc:
            failures: dict[int, BaseException] = dict(exc.failures)
        except Exception as exc:
            if not isinstance(exc, PermanentError | RetryableError):
                self.logger.error(
                    "sink %s raised an unclassified error: %s: %s",
                    self.stats.name,
                    type(exc).__name__,
                    exc,
                )
            failures = dict.fromkeys(range(len(batch)), exc)
        else:
            failures = {}
        if writes and spans is not None:
            spans.end_writes(writes, failures)
        peer_down = self._record(len(batch), failures)
        now = time.monotonic()
        held: list[_Entry] = []
        for index, entry in enumerate(batch):
            try:
                if await self._settle_delivered(entry, failures.get(index), peer_down, now):
                    held.append(entry)
            except Exception as exc:
                # After the write: the peer may have it. Retry (at least once), never a dead
                # letter that would claim it was not delivered.
                await self.fail_unexpected(entry[0], exc, retry=True)
        return held

    async def _settle_delivered(
        self, entry: _Entry, failure: BaseException | None, peer_down: bool, now: float
    ) -> bool:
        """Ack, dead-letter or retry one message of a delivery; True to hold it instead."""
        message, delivery, received = entry
        if failure is None:
            self.stats.published += 1
            self.stats.latency.observe(now - received)
            if delivery.attempt > 1:
                self.forget_error(str(delivery.sequence))
            await self.settle(message, ACK)
            return False
        reason = _reason(failure)
        if not self.retry.is_transient(reason, default=not isinstance(failure, PermanentError)):
            await self.dead_letter(
                message,
                str(delivery.sequence),
                delivery.attempt,
                reason=reason,
                error=str(failure),
                extra_headers=getattr(failure, "headers", None),
            )
            return False
        if peer_down:
            self.stats.count_error(reason)
            self.stats.note_error(f"{reason}: {failure}")
            return True
        # Retryable by its own word, or an error the adapter did not classify: retry, and
        # let max_attempts dead-letter it if it keeps failing while the peer is up.
        retry_after = failure.retry_after if isinstance(failure, RetryableError) else None
        await self.retry_later(
            message,
            str(delivery.sequence),
            delivery.attempt,
            str(failure) or repr(failure),
            reason=reason,
            retry_after=retry_after,
        )
        return False


def _reply_of(item: _Entry) -> str:
    return item[0].reply


def _reason(failure: BaseException) -> str:
    """The kind of a delivery failure: the adapter's own `reason` if it gives one."""
    reason = getattr(failure, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    if isinstance(failure, PermanentError):
        return "permanent"
    return "retryable" if isinstance(failure, RetryableError) else "sink_error"
