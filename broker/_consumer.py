"""What routes and sinks share: a durable consumer, the ack contract, retries and dead letters.

Every component that reads JetStream follows one contract:

* ack an input only after everything it produced is stored (routes) or delivered (sinks);
* zero outputs (filtered) = ack at once;
* transient failure = `nak` with the back-off of its attempt number;
* permanent failure, or more than `retry.max_attempts` attempts = publish a dead letter, and
  `term` the input once the dead letter is stored.

Shutdown drains: no new pull requests, messages that still arrive are naked at once (so another
daemon or the next start takes them without waiting for `ack_wait`), and the component waits
until every message it holds is settled.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping

import anyio
import nats.errors
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from busway._config import RetryPolicy
from busway._delivery import (
    DRAIN_NAK,
    TERM,
    dead_letter_headers,
    delivery_of,
    nak_payload,
    retry_delay,
)
from busway._jetstream import await_pub_ack, ensure_consumer, publish_error
from busway._metrics import ComponentStats
from busway._pull import ContinuousPull

__all__ = ["ConsumerComponent"]

_REMEMBERED_ERRORS = 4096


class ConsumerComponent(abc.ABC):
    """Base of route and sink workers: owns the consumer, the pull loop and the acks."""

    def __init__(
        self,
        *,
        client: NatsClient,
        js: JetStreamContext,
        stats: ComponentStats,
        stream: str,
        filter_subject: str,
        durable: str,
        max_in_flight: int,
        ack_wait: float,
        retry: RetryPolicy,
        dead_letter_subject: str,
        publish_timeout: float,
        start: str | None = None,
    ) -> None:
        self.client = client
        self.js = js
        self.stats = stats
        self.stream = stream
        self.filter_subject = filter_subject
        self.durable = durable
        self.max_in_flight = max_in_flight
        self.ack_wait = ack_wait
        self.retry = retry
        self.dead_letter_subject = dead_letter_subject
        self.publish_timeout = publish_timeout
        self.start = start
        self.logger = logging.getLogger(f"busway.{stats.kind}.{stats.name}")
        self.stopping = False
        self.pull = ContinuousPull(
            client,
            stream=stream,
            durable=durable,
            capacity=max_in_flight,
            handler=self._receive,
            stats=stats,
        )
        self._last_errors: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """Stream sequence → (last error, time of the first failure), for dead letters."""
        self._held: dict[str, tuple[Msg, float]] = {}

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Declare the consumer, start pulling and settling; runs until cancelled."""
        await ensure_consumer(
            self.js,
            stream=self.stream,
            durable=self.durable,
            filter_subject=self.filter_subject,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_in_flight,
            start=self.start,
        )
        async with anyio.create_task_group() as tg:
            await self.start_workers(tg)
            await tg.start(self.pull.run)
            self.stats.ready = True
            self.logger.info(
                "consuming %s from stream %s (consumer %s)",
                self.filter_subject,
                self.stream,
                self.durable,
            )
            task_status.started()

    async def drain(self, timeout: float) -> bool:
        """Stop pulling and wait up to `timeout` for held messages to settle; True if all did."""
        self.stopping = True
        drained = False
        with anyio.move_on_after(timeout):
            await self.pull.drain()
            drained = True
        self.stats.ready = False
        if not drained:
            self.logger.warning(
                "%d message(s) still in flight at shutdown; JetStream redelivers them "
                "after ack_wait",
                self.stats.in_flight,
            )
        return drained

    async def reset_pull(self) -> None:
        """Re-issue pull requests after a reconnect (the server forgot the old ones)."""
        await self.pull.reset()

    async def start_workers(self, tg: anyio.abc.TaskGroup) -> None:  # noqa: B027 - optional hook
        """Start the subclass's own tasks (settling, batching) in `tg` before pulling begins."""

    @abc.abstractmethod
    async def handle(self, message: Msg, sequence: str, attempt: int) -> None:
        """Take ownership of `message`: it must end in `settle` (ack, nak or term) exactly once."""

    async def _receive(self, message: Msg) -> None:
        self.stats.received += 1
        sequence, attempt = delivery_of(message.reply)
        if self.stopping:
            await self.settle(message, DRAIN_NAK)
            return
        if attempt > self.retry.max_attempts:
            last, _ = self._last_errors.get(
                sequence, ("unknown (failed in an earlier process)", 0.0)
            )
            await self.dead_letter(
                message,
                sequence,
                attempt,
                reason="max_attempts",
                error=f"gave up after {attempt - 1} attempt(s); last error: {last}",
            )
            return
        await self.handle(message, sequence, attempt)

    def hold(self, message: Msg, received: float) -> None:
        """Keep `message` alive with `+WPI` until it is settled (see `keep_alive`)."""
        self._held[message.reply] = (message, received)

    async def keep_alive(self) -> None:
        """Tell JetStream that held messages are still being worked on (`+WPI`).

        A sink may hold messages longer than `ack_wait` (a slow peer, a circuit breaker), and
        an aggregating route holds its inputs until their group completes: without this
        JetStream would redeliver them while busway still holds them, and a peer would receive
        them twice. Subclasses that hold messages start it in `start_workers`.
        """
        # A message is refreshed at most two intervals after it arrived (or was last
        # refreshed): half of ack_wait, leaving the other half as margin on a loaded machine.
        interval = max(0.05, self.ack_wait / 4)
        while True:
            await anyio.sleep(interval)
            cutoff = time.monotonic() - interval
            for message, received in list(self._held.values()):
                if received < cutoff:
                    with contextlib.suppress(nats.errors.Error):
                        await self.client.publish(message.reply, b"+WPI")

    async def settle(self, message: Msg, payload: bytes) -> None:
        """Send the ack (`b""`), nak or term `payload` for `message` and free its slot."""
        if self._held:
            self._held.pop(message.reply, None)
        try:
            await self.client.publish(message.reply, payload)
        except nats.errors.Error as exc:
            # The ack is lost with the connection; JetStream redelivers after ack_wait and
            # the outputs' message ids make the second pass harmless.
            self.logger.warning("could not settle %s: %s", message.reply, exc)
        await self.pull.release()

    async def retry_later(
        self,
        message: Msg,
        sequence: str,
        attempt: int,
        error: str,
        *,
        reason: str,
        retry_after: float | None = None,
    ) -> None:
        """Nak `message` with the back-off of `attempt`; remember `error` for its dead letter.

        The last allowed attempt dead-letters at once instead: a redelivery that would only be
        dead-lettered on arrival costs a round trip and reads as one attempt more.
        """
        self._remember_error(sequence, error)
        if attempt >= self.retry.max_attempts and reason != "dead_letter_publish":
            self.stats.count_error(reason)
            await self.dead_letter(
                message,
                sequence,
                attempt,
                reason="max_attempts",
                error=f"gave up after {attempt} attempt(s); last error ({reason}): {error}",
            )
            return
        self.stats.retried += 1
        self.stats.count_error(reason)
        self.stats.note_error(f"{reason}: {error}")
        delay = retry_delay(attempt, self.retry, retry_after)
        self.logger.warning(
            "retrying %s seq %s in %.1fs (attempt %d of %d): %s",
            message.subject,
            sequence,
            delay,
            attempt,
            self.retry.max_attempts,
            error,
        )
        await self.settle(message, nak_payload(delay))

    async def dead_letter(
        self,
        message: Msg,
        sequence: str,
        attempt: int,
        *,
        reason: str,
        error: str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish `message` to the dead-letter subject, then `term` it; nak if that fails."""
        self.stats.count_error(reason)
        self.stats.note_error(f"{reason}: {error}")
        now = time.time()
        _, first_failed = self._last_errors.pop(sequence, ("", now))
        timing = {
            "Busway-First-Failed-At": _iso(first_failed),
            "Busway-Failed-At": _iso(now),
        }
        headers = dead_letter_headers(
            component=self.stats.name,
            kind=self.stats.kind,
            reason=reason,
            error=error,
            subject=message.subject,
            stream=self.stream,
            sequence=sequence,
            attempt=attempt,
            headers=message.headers,
            extra={**timing, **extra_headers} if extra_headers else timing,
        )
        try:
            future = await self.js.publish_async(
                self.dead_letter_subject, message.data, headers=headers
            )
            await await_pub_ack(future, self.dead_letter_subject, self.publish_timeout)
        except Exception as exc:
            failure = publish_error(exc, self.dead_letter_subject)
            await self.retry_later(
                message,
                sequence,
                attempt,
                f"{error}; and dead-lettering failed: {failure}",
                reason="dead_letter_publish",
            )
            return
        self.stats.dead_lettered += 1
        self.logger.error(
            "dead-lettered %s seq %s to %s (%s): %s",
            message.subject,
            sequence,
            self.dead_letter_subject,
            reason,
            error,
        )
        await self.settle(message, TERM)

    def _remember_error(self, sequence: str, error: str) -> None:
        errors = self._last_errors
        _, first_failed = errors.get(sequence, ("", time.time()))
        errors[sequence] = (error, first_failed)
        errors.move_to_end(sequence)
        if len(errors) > _REMEMBERED_ERRORS:
            errors.popitem(last=False)

    def forget_error(self, sequence: str) -> None:
        """Drop the remembered error of a message that finally succeeded."""
        if self._last_errors:
            self._last_errors.pop(sequence, None)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()
