"""Runs one sink: pull → batch → `Sink.write` → ack the batch, or retry / dead-letter each.

Batches form from what has already arrived: the batcher takes everything queued (up to
`batch_size`) and, while the batch is not full, waits at most `batch_wait` for more. A sink
that fsyncs or commits per batch thus pays once per batch under load and adds at most
`batch_wait` of latency when traffic is light.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from nats.aio.msg import Msg

from busway._circuit import HALF_OPEN, OPEN, CircuitBreaker
from busway._components import Message, Sink
from busway._config import CircuitConfig
from busway._consumer import ConsumerComponent
from busway._delivery import ACK
from busway._errors import BatchError, PermanentError, RetryableError

__all__ = ["SinkWorker"]


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
        # Room for every message the pull loop may hold: it never requests more than that.
        self._queue_in: MemoryObjectSendStream[tuple[Msg, Message, float]]
        self._queue_out: MemoryObjectReceiveStream[tuple[Msg, Message, float]]
        self._queue_in, self._queue_out = anyio.create_memory_object_stream(self.max_in_flight)

    async def start_workers(self, tg: anyio.abc.TaskGroup) -> None:
        """Open the sink and start the batcher and the keep-alive."""
        await self.sink.open()
        tg.start_soon(self._write_batches)
        tg.start_soon(self.keep_alive)

    async def handle(self, message: Msg, sequence: str, attempt: int) -> None:
        """Queue `message` for the batcher (never blocks: the queue holds `max_in_flight`)."""
        headers = message.headers or {}
        delivery = Message(
            subject=message.subject,
            data=message.data,
            headers=headers,
            id=headers.get("Nats-Msg-Id") or f"{self.stream}:{sequence}",
            stream=self.stream,
            sequence=int(sequence),
            attempt=attempt,
        )
        received = time.monotonic()
        self.hold(message, received)
        self._queue_in.send_nowait((message, delivery, received))

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
                # [isolation] a suspect is written alone, in a batch of its own
                for part in self.isolation.split(batch, _reply_of):
                    await self._deliver_through_breaker(part)
        finally:
            self._queue_in.close()
            self._queue_out.close()
            with anyio.CancelScope(shield=True):
                await self.sink.close()

    def _fill(self, batch: list[tuple[Msg, Message, float]]) -> None:
        while len(batch) < self.batch_size:
            try:
                batch.append(self._queue_out.receive_nowait())
            except anyio.WouldBlock:
                return

    async def _deliver_through_breaker(self, batch: list[tuple[Msg, Message, float]]) -> None:
        """Deliver `batch`, waiting out an open circuit and probing with one message."""
        breaker = self.breaker
        while batch:
            wait = breaker.wait_time()
            if wait > 0:
                self.stats.circuit = OPEN
                await anyio.sleep(wait)
                continue
            if breaker.state == HALF_OPEN:
                self.stats.circuit = HALF_OPEN
                probe, batch = batch[:1], batch[1:]
                await self._deliver(probe)
            else:
                await self._deliver(batch)
                batch = []

    def _record(self, batch_size: int, failures: dict[int, BaseException]) -> None:
        """Tell the breaker how the delivery went; open the circuit if it says so."""
        breaker = self.breaker
        transient = sum(not isinstance(f, PermanentError) for f in failures.values())
        if transient < batch_size:
            # Something got through, or the peer answered "permanent" (it is up): close.
            breaker.succeeded()
        elif breaker.failed():
            self.pull.pause_until(time.monotonic() + breaker.cool_down)
            self.logger.warning(
                "circuit open: %d consecutive failed deliveries; pausing for %.0fs",
                breaker.failures,
                breaker.cool_down,
            )
        self.stats.circuit = breaker.state
        self.stats.ready = self.sink.ready() and breaker.state != OPEN

    async def _deliver(self, batch: list[tuple[Msg, Message, float]]) -> None:
        try:  # [isolation] guarded: alone if a suspect
            await self.isolation.guard(
                batch[0][0].reply, self.sink.write, [delivery for _, delivery, _ in batch]
            )
        except BatchError as exc:
            failures: dict[int, BaseException] = dict(exc.failures)
        except Exception as exc:
            if not isinstance(exc, PermanentError | RetryableError):
                self.logger.exception("sink %s raised an unclassified error", self.stats.name)
            failures = dict.fromkeys(range(len(batch)), exc)
        else:
            failures = {}
        self._record(len(batch), failures)
        now = time.monotonic()
        for index, (message, delivery, received) in enumerate(batch):
            failure = failures.get(index)
            if failure is None:
                self.stats.published += 1
                self.stats.latency.observe(now - received)
                if delivery.attempt > 1:
                    self.forget_error(str(delivery.sequence))
                await self.settle(message, ACK)
            elif not self.retry.is_transient(
                _reason(failure), default=not isinstance(failure, PermanentError)
            ):
                await self.dead_letter(
                    message,
                    str(delivery.sequence),
                    delivery.attempt,
                    reason=_reason(failure),
                    error=str(failure),
                    extra_headers=getattr(failure, "headers", None),
                )
            else:
                # Retryable by its own word, or an error the adapter did not classify: retry,
                # and let max_attempts dead-letter it if it keeps failing.
                reason = _reason(failure)
                retry_after = failure.retry_after if isinstance(failure, RetryableError) else None
                await self.retry_later(
                    message,
                    str(delivery.sequence),
                    delivery.attempt,
                    str(failure) or repr(failure),
                    reason=reason,
                    retry_after=retry_after,
                )


def _reply_of(item: tuple[Msg, Message, float]) -> str:
    return item[0].reply


def _reason(failure: BaseException) -> str:
    """The kind of a delivery failure: the adapter's own `reason` if it gives one."""
    reason = getattr(failure, "reason", None)
    if isinstance(reason, str) and reason:
        return reason
    if isinstance(failure, PermanentError):
        return "permanent"
    return "retryable" if isinstance(failure, RetryableError) else "sink_error"
