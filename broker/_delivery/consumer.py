"""What routes and sinks share: a durable consumer, the ack contract, retries and dead letters.

Every component that reads JetStream follows one contract:

* ack an input only after everything it produced is stored (routes) or delivered (sinks);
* zero outputs (filtered) = ack at once;
* transient failure = `nak` with the back-off of its attempt number;
* permanent failure, or `retry.max_attempts` real attempts = publish a dead letter, and
  `term` the input once the dead letter is stored. Real attempts are failures and crashes
  of the process while the message was processed alone, not JetStream's deliveries: a
  redelivery that may follow a crash is processed alone first (see `busway._delivery.isolation`).

Shutdown drains: no new pull requests, messages that still arrive are naked at once (so another
daemon or the next start takes them without waiting for `ack_wait`), and the component waits
until every message it holds is settled.

Whatever happens, a message is settled and its slot freed exactly once:

* per-message work runs in tasks of the component's own task group (the pull's delivery task,
  and tasks subclasses start with `task_group`), never in nats-py's subscription task;
* an exception no handler classified is caught where the message was taken and settled by
  `fail_unexpected`: retried if it looks transient, dead-lettered with its own text if not;
* `settle` is idempotent per delivery: a second settle of the same delivery sends nothing,
  frees nothing, and is counted (`settled_twice`) and logged as the bug it is;
* every held message is kept alive with `+WPI` (a slow sink, an open circuit, a throttle, a
  waiting stage), and a component whose slots are all taken with nothing settled for longer
  than `ack_wait` reports itself stalled (not ready) instead of hiding behind `/readyz` 200.
"""

from __future__ import annotations

import abc
import contextlib
import datetime
import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import anyio
from anyio.abc import TaskGroup, TaskStatus

from busway._config.model import RetryPolicy
from busway._delivery.contract import (
    ACK,
    DRAIN_NAK,
    REPLAY_FOR_HEADER,
    TERM,
    dead_letter_headers,
    nak_payload,
    retry_delay,
)
from busway._delivery.delivery import Delivery
from busway._delivery.isolation import AttemptLedger, Isolation, IsolationGate
from busway._errors import PermanentError, PublishError
from busway._nats.cluster import until_ready
from busway._nats.errors import looks_transient
from busway._nats.jetstream import ensure_consumer, publish_confirmed
from busway._nats.pull import ContinuousPull
from busway._observe.audit import AuditTrail
from busway._observe.metrics import ComponentStats
from busway._observe.readiness import WriteRefusals
from busway._observe.tracing import log_extra

if TYPE_CHECKING:
    from busway._nats.types import JetStream, NatsClient
    from busway._observe.spans import Spans

__all__ = ["ConsumerComponent"]

_REMEMBERED_ERRORS = 4096


class ConsumerComponent(abc.ABC):
    """Base of route and sink workers: owns the consumer, the pull loop and the acks."""

    def __init__(
        self,
        *,
        client: NatsClient,
        js: JetStream,
        stats: ComponentStats,
        stream: str,
        filter_subject: str,
        durable: str,
        max_in_flight: int,
        ack_wait: float,
        retry: RetryPolicy,
        dead_letter_subject: str,
        publish_timeout: float,
        refusals: WriteRefusals | None = None,
        gate: IsolationGate,
        ledger: AttemptLedger,
        start: str | None = None,
        startup_timeout: float = 0.0,
        audit: AuditTrail | None = None,
        spans: Spans | None = None,
        partitioned_stream: bool = False,
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
        self.refusals = refusals if refusals is not None else WriteRefusals()
        """Where refused writes (JetStream full) are reported, for `/readyz`."""
        self.start = start
        self.audit = audit
        """Where dead letters are recorded (`[audit]`); None when the trail is off."""
        self.spans = spans
        """`[tracing]`'s spans; None when tracing is off (the hot path tests only that)."""
        self._route_spans = spans if stats.kind == "route" else None
        self.startup_timeout = startup_timeout
        """How long declaring the consumer is retried while JetStream is not ready."""
        self.partitioned_stream = partitioned_stream
        """The stream appends a partition token to stored subjects: a dead letter records the
        subject as published, without it, so a replay goes where the stream captures it."""
        self.logger = logging.getLogger(f"busway.{stats.kind}.{stats.name}")
        self.stopping = False
        self.pull = ContinuousPull(
            client,
            stream=stream,
            durable=durable,
            capacity=max_in_flight,
            owner=self,
            handler=self._receive,
            on_error=self.fail_unexpected,
            stats=stats,
        )
        self._last_errors: OrderedDict[str, tuple[str, float]] = OrderedDict()
        """Stream sequence → (last error, time of the first failure), for dead letters."""
        self._replay_address = f"{stats.kind}:{stats.name}"
        """What `Busway-Replay-For` says on a replayed dead letter meant for this component."""
        self._task_group: TaskGroup | None = None
        self._stall_mark = (0, time.monotonic())
        """(settled count, when it last moved) for the stall check."""
        # [isolation] Crash culprits and the messages beside them: see busway._delivery.isolation.
        self.isolation = Isolation(self, gate, ledger)
        self.gate = gate
        self.suspects = self.isolation.suspects
        """Suspects waiting to be processed alone, by reply subject (empty on the hot path)."""

    @property
    def task_group(self) -> TaskGroup:
        """The component's task group: per-message tasks run here (and end with it)."""
        assert self._task_group is not None, "the component is not running"
        return self._task_group

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Declare the consumer, start pulling and settling; runs until cancelled."""
        await until_ready(
            f"consumer {self.durable!r}",
            functools.partial(
                ensure_consumer,
                self.js,
                stream=self.stream,
                durable=self.durable,
                filter_subject=self.filter_subject,
                ack_wait=self.ack_wait,
                max_ack_pending=self.max_in_flight,
                start=self.start,
            ),
            timeout=self.startup_timeout,
            client=self.client,
        )
        async with anyio.create_task_group() as tg:
            self._task_group = tg
            await self.start_workers(tg)
            tg.start_soon(self.keep_alive)
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
    async def handle(self, message: Delivery) -> None:
        """Take ownership of `message`: it must end in `settle` (ack, nak or term) exactly once."""

    async def _receive(self, message: Delivery) -> None:
        self.stats.received += 1
        # -- replay addressing: a dead letter replayed for another consumer of this subject.
        headers = message.headers
        if headers and headers.get(REPLAY_FOR_HEADER, self._replay_address) != self._replay_address:
            await self._skip_replay(message)
            return
        # --
        if self.stopping:
            await self.settle(message, DRAIN_NAK)
            return
        # [isolation] A redelivery is trusted, processed alone, or dead-lettered on arrival.
        attempt = message.attempt
        if attempt > 1 and not await self.isolation.admit(message, message.sequence, attempt):
            return
        if self._route_spans is not None:  # [tracing] the route's span, if sampled
            await self._route_spans.route_hop(self.handle, message, self.stats.name)
            return
        await self.handle(message)

    async def _skip_replay(self, message: Delivery) -> None:
        """Ack a replay meant for another component unprocessed (counted as filtered)."""
        self.stats.filtered += 1
        self.stats.count("replay_skipped")
        await self.settle(message, ACK)

    async def keep_alive(self) -> None:
        """Tell JetStream that held messages are still being worked on (`+WPI`); watch for
        a stall.

        Any message may be held longer than `ack_wait`: a slow sink or an open circuit, a
        `throttle` queue, a waiting stage, an aggregate group. Without this JetStream would
        redeliver it while busway still holds it, the copy would burn an attempt, and a peer
        might receive it twice. Every held message is refreshed, so no stage has to opt in.
        """
        # The pull stamps each message with the tick it arrived in; a message is refreshed
        # at the second tick after that (or after its last refresh): at most two intervals,
        # half of ack_wait, leaving the other half as margin on a loaded machine.
        interval = max(0.05, self.ack_wait / 4)
        pull = self.pull
        held = pull.held
        while True:
            await anyio.sleep(interval)
            pull.tick += 1
            stale = pull.tick - 2
            due = [reply for reply, tick in held.items() if tick <= stale]
            for reply in due:
                held[reply] = pull.tick
            send = pull.send
            for reply in due:
                if reply in held:  # not settled meanwhile: a late +WPI would undo a nak delay
                    with contextlib.suppress(Exception):  # a lost +WPI: see `pull.send`
                        await send(reply, b"+WPI")
            self._check_stall()

    def _check_stall(self) -> None:
        """Report the component stalled while all its slots are taken and nothing settled for
        longer than `ack_wait`; clear it once something settles. A component that already
        says why it is not ready (a sink's open circuit, a drain) is not called stalled."""
        settled, since = self._stall_mark
        now = time.monotonic()
        if (
            self.pull.released != settled
            or len(self.pull.held) < self.max_in_flight  # own slots: partitions share stats
            or not self.stats.ready
        ):
            self._stall_mark = (self.pull.released, now)
            if self.stats.problems.pop("stalled", None) is not None:
                self.logger.info("no longer stalled: messages are settling again")
            return
        if now - since > self.ack_wait and "stalled" not in self.stats.problems:
            reason = (
                f"stalled: all {self.max_in_flight} in-flight slot(s) taken and none settled "
                f"for {now - since:.0f}s (ack_wait {self.ack_wait:g}s)"
            )
            self.stats.problems["stalled"] = reason
            self.logger.error("%s %s", self.stats.kind, reason)

    async def settle(self, message: Delivery, payload: bytes) -> None:
        """Send the ack (`b""`), nak or term `payload` for `message` and free its slot.

        Idempotent per delivery (the record says whether it was settled, the pull's book
        whether its slot is free): settling it again sends nothing and frees nothing; it is
        counted (`settled_twice`) and logged, because it is a bug.
        """
        reply = message.reply
        if not message.claim_settle() or not self.pull.forget(reply):
            self.stats.count_error("settled_twice")
            self.logger.error(
                "bug: %s was settled twice (the second, %r, is ignored)", reply, payload[:5]
            )
            return
        if self.isolation.tracks and payload in (ACK, TERM):  # [isolation]
            self.isolation.settled(message)
        try:
            await self.pull.send(reply, payload)
        except Exception as exc:
            # The ack is lost with the connection; JetStream redelivers after ack_wait and
            # the outputs' message ids make the second pass harmless.
            self.logger.warning("could not settle %s: %s", reply, exc)
        await self.pull.make_room()

    async def touch(self, message: Delivery) -> None:
        """Tell JetStream `message` is still being worked on (`+WPI`); a lost one is harmless
        (`keep_alive` sends the next)."""
        if not message.settled:
            with contextlib.suppress(Exception):
                await self.pull.send(message.reply, b"+WPI")

    async def fail_unexpected(
        self, message: Delivery, exc: Exception, *, retry: bool = False
    ) -> None:
        """Settle a message whose handling raised an error no handler classified.

        Retried with back-off if the error looks transient (I/O, a timeout, a lost connection,
        a `RetryableError`) or the caller says so (`retry`: the message may already have been
        delivered, so a dead letter could be a lie); dead-lettered at once otherwise
        (`unexpected`, with the error's own text), since a retry would only fail the same way.
        `retry.transient` / `retry.permanent` override by reason. A message already settled
        is left alone.
        """
        if message.settled:
            self.logger.error(
                "bug: an error escaped after %s was settled: %s", message.reply, _describe(exc)
            )
            return
        sequence, attempt = message.sequence, message.attempt
        error = _describe(exc)
        self.logger.error(
            "%s seq %s failed unexpectedly: %s",
            message.subject,
            sequence,
            error,
            extra=log_extra(message.headers),
        )
        self.logger.debug("traceback of the unexpected failure", exc_info=exc)
        transient = retry or looks_transient(exc)
        if isinstance(exc, PermanentError):
            transient = False
        try:
            if self.retry.is_transient("unexpected", default=transient):
                await self.retry_later(message, sequence, attempt, error, reason="unexpected")
            else:
                await self.dead_letter(message, sequence, attempt, reason="unexpected", error=error)
        except Exception as again:
            # Settling failed too (a bug in the failure path itself): nak, so the slot is
            # freed and JetStream redelivers; never leave the message hanging.
            self.logger.error("could not settle %s after a failure: %s", sequence, again)
            if not message.settled:
                await self.settle(message, nak_payload(float(self.retry.backoff)))

    def note_publish_failure(self, error: BaseException) -> None:
        """Report a refused write (JetStream full) so `/readyz` tells; others pass."""
        if isinstance(error, PublishError) and error.store_full and error.subject:
            self.refusals.refused(error.subject, error.description)

    def note_stored(self, subject: str) -> None:
        """A write to `subject` succeeded: end a refusal reported for it, if any."""
        if self.refusals.active:
            self.refusals.stored(subject)

    async def retry_later(
        self,
        message: Delivery,
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
        attempt = self.isolation.attempt_of(message)  # [isolation] real attempts, not deliveries
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
            extra=log_extra(message.headers),
        )
        await self.isolation.failed(  # [isolation]
            message, sequence, error, counted=reason != "dead_letter_publish"
        )
        await self.settle(message, nak_payload(delay))

    async def dead_letter(
        self,
        message: Delivery,
        sequence: str,
        attempt: int,
        *,
        reason: str,
        error: str,
        extra_headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish `message` to the dead-letter subject, then `term` it; nak if that fails."""
        attempt = min(attempt, self.isolation.attempt_of(message))  # [isolation] real attempts
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
            subject=message.subject.rpartition(".")[0]
            if self.partitioned_stream
            else message.subject,
            stream=self.stream,
            sequence=sequence,
            attempt=attempt,
            headers=message.headers,
            extra={**timing, **extra_headers} if extra_headers else timing,
        )
        try:
            await publish_confirmed(
                self.js,
                self.dead_letter_subject,
                message.data,
                headers=headers,
                timeout=self.publish_timeout,
            )
        except PublishError as failure:
            self.note_publish_failure(failure)
            await self.retry_later(
                message,
                sequence,
                attempt,
                f"{error}; and dead-lettering failed: {failure}",
                reason="dead_letter_publish",
            )
            return
        self.note_stored(self.dead_letter_subject)
        self.stats.dead_lettered += 1
        if self.audit is not None:  # [audit] who gave up on what, and why
            await self.audit.dead_letter(
                component=self.stats.name, kind=self.stats.kind, headers=headers, stats=self.stats
            )
        self.logger.error(
            "dead-lettered %s seq %s to %s (%s): %s",
            message.subject,
            sequence,
            self.dead_letter_subject,
            reason,
            error,
            extra=log_extra(message.headers),
        )
        await self.settle(message, TERM)

    def _remember_error(self, sequence: str, error: str) -> None:
        errors = self._last_errors
        _, first_failed = errors.get(sequence, ("", time.time()))
        errors[sequence] = (error, first_failed)
        errors.move_to_end(sequence)
        if len(errors) > _REMEMBERED_ERRORS:
            errors.popitem(last=False)

    def last_error(self, sequence: str) -> str:
        """The last error this process recorded for `sequence` ("" if none)."""
        return self._last_errors.get(sequence, ("", 0.0))[0]

    def forget_error(self, sequence: str) -> None:
        """Drop the remembered error of a message that finally succeeded."""
        if self._last_errors:
            self._last_errors.pop(sequence, None)


def _describe(exc: BaseException) -> str:
    """`Type: message` of an exception, for logs and dead letters (never a traceback)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()
