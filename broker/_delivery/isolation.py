"""Poison messages that crash the whole daemon: find the culprit, spare the messages beside it.

JetStream counts deliveries, not attempts. When a message kills the process (`os._exit` in a
stage, a segfaulting driver, the OOM killer), every message the process held is redelivered
with its delivery count raised, though only one of them was at fault; counting deliveries as
attempts dead-letters the innocent ones (and some of them were already published downstream).
busway counts *real* attempts instead, and finds the culprit by elimination:

* A redelivery is **trusted** when it directly follows this process's own nak after a failure
  (its delivery count is the nak's plus one): nothing happened to it in between.
* Any other redelivery is a **suspect**: the process that held it may have died while
  processing it (after any restart, every redelivery is one; so is a message another daemon
  naked, or one whose ack was lost).
* A suspect is processed **alone**, process-wide (one `IsolationGate` per `Bus`, because a crash
  kills every component): it waits until no other message is being processed (stage or sink
  work; messages merely waiting for PubAcks do not count), and no other message starts while it
  is processed. Before processing it, a marker naming this process is written to the state
  bucket, keyed by consumer and stream sequence; it is cleared as soon as the processing ends.
* A suspect that arrives to find a marker crashed the process it was alone in: that counts as
  one attempt. Failures naked by busway count too, and are recorded in the same entry, so a
  daemon that restarts, or a second daemon on the same config, goes on counting. Redeliveries
  caused by other messages' crashes, graceful restarts and lost acks count for nothing.
* Once its attempts reach `retry.max_attempts`, a suspect is dead-lettered on arrival without
  being processed again: reason `crashed` when its last attempt crashed the process.

The hot path pays two attribute checks per message: a fresh message (delivery count 1) never
touches the ledger, and the gate is only consulted while a suspect waits or runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeVar

import anyio
import msgspec
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from busway._delivery.contract import nak_payload
from busway._delivery.delivery import Delivery
from busway._errors import RetryableError, StartupError
from busway._nats.jetstream import open_state
from busway._nats.kv import KeyValueState

if TYPE_CHECKING:
    from busway._delivery.consumer import ConsumerComponent
    from busway._nats.types import JetStream

__all__ = ["AttemptLedger", "Isolation", "IsolationGate"]

logger = logging.getLogger("busway.isolation")

_P = ParamSpec("_P")
_T = TypeVar("_T")

_KEY_PREFIX = "isolation."
_REMEMBERED = 4096
_MAX_ERROR = 512
# How long a suspect whose ledger entry cannot be read waits before it comes back: not an
# attempt, only a pause while the state bucket is unreachable.
_LEDGER_DOWN_DELAY = 2.0


class IsolationGate:
    """Normal work shares the process; a suspect has it alone (a writer-preferring lock).

    Normal work: `if not gate.open: await gate.wait_open()`, then `enter()` / `leave()` around
    work that awaits (synchronous work needs no count: nothing else runs meanwhile). A suspect:
    `async with gate.alone(key): ...`. Once a suspect waits, no new work starts (so a busy
    process cannot starve it); suspects take turns in arrival order.
    """

    def __init__(self) -> None:
        self.open = True
        """False while a suspect waits or is processed: new work must wait."""
        self.isolating: str | None = None
        """The key of the suspect being processed alone, if any."""
        self._working = 0
        self._suspects = 0
        self._turn = anyio.Lock()
        self._idle: anyio.Event | None = None
        self._reopened = anyio.Event()
        self._closed_at = 0.0
        self._alone_count = 0

    @property
    def working(self) -> int:
        """Normal messages being processed now."""
        return self._working

    async def wait_open(self) -> None:
        """Return once no suspect waits or is processed."""
        while not self.open:
            await self._reopened.wait()

    def enter(self) -> None:
        """Normal work begins (call right after seeing `open`, with no await in between)."""
        self._working += 1

    def leave(self) -> None:
        """Normal work ended; wakes a waiting suspect when it was the last."""
        self._working -= 1
        if self._idle is not None and not self._working:
            self._idle.set()

    @contextlib.asynccontextmanager
    async def alone(self, key: str) -> AsyncIterator[None]:
        """Wait for the process to be idle, then hold it alone for the block."""
        if not self._suspects:
            self.open = False
            self._reopened = anyio.Event()
            self._closed_at = time.monotonic()
            self._alone_count = 0
        self._suspects += 1
        try:
            async with self._turn:
                while self._working:
                    self._idle = anyio.Event()
                    await self._idle.wait()
                self._idle = None
                self.isolating = key
                self._alone_count += 1
                try:
                    yield
                finally:
                    self.isolating = None
        finally:
            self._suspects -= 1
            if not self._suspects:
                self.open = True
                self._reopened.set()
                logger.log(
                    logging.INFO if self._alone_count >= 10 else logging.DEBUG,
                    "processed %d suspect redelivery(ies) one at a time in %.1fs; "
                    "normal processing resumes",
                    self._alone_count,
                    time.monotonic() - self._closed_at,
                )


class _Entry(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A ledger entry: what JetStream's delivery count cannot tell about one message."""

    attempts: int = 0
    """Real attempts that ended: failures busway naked, and crashes while processed alone."""
    crashes: int = 0
    """Of which crashes."""
    owner: str = ""
    """Set while the message is processed alone: the process (`AttemptLedger.owner`) doing it."""
    error: str = ""
    """The last failure's error, for the dead letter if another process gives up."""
    body: str = ""
    """Digest of the body: an entry left for a stream sequence that was later reused (stream
    deleted and recreated) does not apply to the new message."""


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(_Entry).decode


class AttemptLedger:
    """Ledger entries in the state bucket (`isolation.<consumer>.<stream sequence>`), shared by
    every daemon on the same config; one per `Bus`, opened on first use.

    Reads and writes raise RetryableError (with a deadline); deletions of settled messages run
    in the background (`run`), so an ack never waits for the ledger.
    """

    def __init__(self, js: JetStream, bucket: str, *, timeout: float) -> None:
        self.owner = uuid.uuid4().hex[:16]
        """This process's token in the markers it writes."""
        self._js = js
        self._bucket = bucket
        self._timeout = timeout
        self._state: KeyValueState | None = None
        self._forget_in: MemoryObjectSendStream[str]
        self._forget_out: MemoryObjectReceiveStream[str]
        self._forget_in, self._forget_out = anyio.create_memory_object_stream(_REMEMBERED)
        self._finished = anyio.Event()

    async def read(self, key: str, body: str) -> _Entry | None:
        """The entry of `key`, or None (none, unreadable, or about another body)."""
        with self._deadline(key):
            raw = await (await self._store()).get(key)
        if not raw:
            return None
        try:
            entry = _decode(raw)
        except msgspec.DecodeError:
            logger.warning("ignoring an unreadable isolation entry %r: %r", key, raw[:80])
            return None
        return entry if entry.body == body else None

    async def write(self, key: str, entry: _Entry) -> None:
        """Store `entry` under `key`."""
        with self._deadline(key):
            await (await self._store()).put(key, _encode(entry))

    async def delete(self, key: str) -> None:
        """Forget `key` now."""
        with self._deadline(key):
            await (await self._store()).delete(key)

    def delete_later(self, key: str) -> None:
        """Forget `key` soon, in the background (dropped with a warning if far behind)."""
        try:
            self._forget_in.send_nowait(key)
        except anyio.WouldBlock:
            logger.warning("isolation ledger deletions far behind: leaving %r", key)
        except anyio.ClosedResourceError:
            logger.debug("stopping: leaving isolation entry %r", key)

    async def run(self) -> None:
        """Delete the entries of settled messages; runs until cancelled or `close`d."""
        try:
            async with self._forget_out:
                async for key in self._forget_out:
                    try:
                        await self.delete(key)
                    except RetryableError as exc:
                        logger.warning("%s (a stale entry only costs a few bytes)", exc)
        finally:
            self._forget_in.close()  # cancelled before `close`: later deletions are dropped
            self._finished.set()

    async def close(self, timeout: float) -> None:
        """At shutdown: finish the deletions already asked for, for at most `timeout`."""
        self._forget_in.close()
        with anyio.move_on_after(timeout):
            await self._finished.wait()

    async def _store(self) -> KeyValueState:
        if self._state is None:
            try:
                bucket = await open_state(self._js, self._bucket)
            except StartupError as exc:
                raise RetryableError(str(exc)) from exc
            self._state = KeyValueState(bucket, _KEY_PREFIX)
        return self._state

    @contextlib.contextmanager
    def _deadline(self, key: str) -> Iterator[None]:
        try:
            with anyio.fail_after(self._timeout):
                yield
        except TimeoutError:
            raise RetryableError(
                f"isolation entry {key!r}: state bucket {self._bucket!r} did not answer "
                f"within {self._timeout:g}s"
            ) from None


@dataclass(slots=True, eq=False)
class _Track:
    """What this process knows about one message (by stream sequence)."""

    sequence: str
    delivered: int
    """JetStream's delivery count of the latest delivery seen."""
    attempts: int
    """Real attempts that ended before that delivery."""
    crashes: int = 0
    body: str = ""
    error: str = ""
    crashed: bool = False
    """Its last attempt crashed the process."""
    naked: bool = False
    """This process naked that delivery after a failure: the next one is trusted."""
    stored: bool = False
    """A ledger entry exists."""
    clean: bool = False
    """The entry stored is the unmarked one `failed` wrote."""
    alone: bool = False
    """Being processed alone now."""
    settled: bool = False
    """Acked or terminated while being processed alone (its section deletes the entry)."""


class Isolation:
    """One component's side of the rule: admits redeliveries, runs suspects alone, counts.

    The component calls `admit` for every redelivery, `guard` around its processing (stages, a
    sink write), `attempt_of` / `failed` when it naks, and `settled` when it acks or terms.
    """

    def __init__(
        self, component: ConsumerComponent, gate: IsolationGate, ledger: AttemptLedger
    ) -> None:
        self.component = component
        self.gate = gate
        self.ledger = ledger
        self.suspects: dict[str, _Track] = {}
        """Suspects admitted and not yet processed, by delivery (reply subject)."""
        self.tracks: OrderedDict[str, _Track] = OrderedDict()
        """Redelivered or failed messages, by stream sequence; empty on a healthy hot path."""

    def _key(self, sequence: str) -> str:
        return f"{self.component.durable}.{sequence}"

    async def admit(self, message: Delivery, sequence: str, delivered: int) -> bool:
        """Decide on a redelivery: True to process it (alone if it is a suspect), False if it
        was settled here (dead-lettered on arrival, or naked while the ledger is down)."""
        track = self.tracks.get(sequence)
        if track is not None and track.naked and delivered == track.delivered + 1:
            track.naked = False
            track.delivered = delivered
            if track.attempts < self.component.retry.max_attempts:
                return True
            # Only a nak after a failed dead-letter publish brings a message back here.
            await self._give_up(message, track)
            return False
        return await self._admit_suspect(message, sequence, delivered)

    async def _admit_suspect(self, message: Delivery, sequence: str, delivered: int) -> bool:
        component = self.component
        key = self._key(sequence)
        body = _digest(message.data)
        try:
            entry = await self.ledger.read(key, body)
            # A marker of another process: it died while processing this message alone. (This
            # process's own marker means JetStream redelivered it while it runs here.)
            crashed = entry is not None and entry.owner not in ("", self.ledger.owner)
            if crashed:
                assert entry is not None
                # Count the crash once: the marker is gone from now on.
                entry = _Entry(
                    attempts=entry.attempts + 1,
                    crashes=entry.crashes + 1,
                    error=entry.error,
                    body=body,
                )
                await self.ledger.write(key, entry)
        except RetryableError as exc:
            component.stats.count_error("isolation")
            component.logger.warning(
                "cannot tell whether seq %s crashed the process (%s); retrying in %.0fs",
                sequence,
                exc,
                _LEDGER_DOWN_DELAY,
            )
            await component.settle(message, nak_payload(_LEDGER_DOWN_DELAY))
            return False
        track = _Track(
            sequence,
            delivered,
            entry.attempts if entry else 0,
            entry.crashes if entry else 0,
            body,
            entry.error if entry else "",
            stored=entry is not None,
            crashed=crashed,
        )
        self._remember(track)
        if crashed:
            component.logger.warning(
                "seq %s crashed the process while processed alone (%d crash(es), attempt %d of %d)",
                sequence,
                track.crashes,
                track.attempts,
                component.retry.max_attempts,
            )
        if track.attempts >= component.retry.max_attempts:
            await self._give_up(message, track)
            return False
        # Suspects may wait their turn longer than ack_wait: the component's keep-alive
        # refreshes every held message, these too.
        self.suspects[message.reply] = track
        return True

    async def _give_up(self, message: Delivery, track: _Track) -> None:
        component = self.component
        if track.crashed:
            reason = "crashed"
            error = (
                f"crashed the process {track.crashes} time(s) while processed alone "
                f"(retry.max_attempts = {component.retry.max_attempts}); not processed again"
            )
        else:
            reason = "max_attempts"
            last = (
                component.last_error(track.sequence)
                or track.error
                or "unknown (failed in an earlier process)"
            )
            error = f"gave up after {track.attempts} attempt(s); last error: {last}"
        await component.dead_letter(
            message, track.sequence, track.attempts, reason=reason, error=error
        )

    def attempt_of(self, message: Delivery) -> int:
        """The real attempt number of this delivery (failures and isolated crashes before it,
        plus one); the delivery count for a message this process knows nothing about."""
        sequence, delivered = message.sequence, message.attempt
        track = self.tracks.get(sequence)
        if track is not None and track.delivered == delivered:
            return track.attempts + 1
        return delivered

    async def failed(self, message: Delivery, sequence: str, error: str, *, counted: bool) -> None:
        """This delivery failed with `error` and is about to be naked: count it (if
        `counted`), in the ledger too, so the next delivery knows wherever it lands."""
        delivered = message.attempt
        track = self.tracks.get(sequence)
        if track is None or track.delivered != delivered:
            track = _Track(sequence, delivered, delivered - 1, body=_digest(message.data))
            self._remember(track)
        track.naked = True
        if not counted:
            return
        track.attempts += 1
        track.crashed = False
        track.error = error[:_MAX_ERROR]
        entry = _entry(track)
        try:
            await self.ledger.write(self._key(sequence), entry)
        except RetryableError as exc:
            # The local count still holds while this process lives.
            self.component.logger.warning("attempt of seq %s not recorded: %s", sequence, exc)
        else:
            track.stored = track.clean = True

    def settled(self, message: Delivery) -> None:
        """`message` was acked or terminated: forget it (and its ledger entry)."""
        sequence = message.sequence
        track = self.tracks.pop(sequence, None)
        if track is None:
            return
        if track.alone:
            track.settled = True  # its section deletes the entry when it ends
        elif track.stored:
            self.ledger.delete_later(self._key(sequence))

    async def guard(
        self,
        delivery: str,
        work: Callable[_P, Awaitable[_T]],
        *args: _P.args,
        **kwargs: _P.kwargs,
    ) -> _T:
        """`await work(...)`, the processing of the message delivered on `delivery` (its reply
        subject): alone if it is a suspect, else once no suspect waits, counted as work."""
        if self.suspects and delivery in self.suspects:
            async with self._alone(delivery):
                return await work(*args, **kwargs)
        gate = self.gate
        if not gate.open:
            await gate.wait_open()
        gate.enter()
        try:
            return await work(*args, **kwargs)
        finally:
            gate.leave()

    def split(self, batch: list[_T], delivery_of_item: Callable[[_T], str]) -> list[list[_T]]:
        """`batch` as batches a sink may write: its normal messages together, each suspect in
        a batch of its own."""
        suspects = self.suspects
        if not suspects:
            return [batch]
        normal = [item for item in batch if delivery_of_item(item) not in suspects]
        parts = [normal] if normal else []
        parts.extend([item] for item in batch if delivery_of_item(item) in suspects)
        return parts

    @contextlib.asynccontextmanager
    async def _alone(self, delivery: str) -> AsyncIterator[None]:
        track = self.suspects[delivery]
        key = self._key(track.sequence)
        async with self.gate.alone(key):
            try:
                await self.ledger.write(key, _entry(track, owner=self.ledger.owner))
            except RetryableError as exc:
                # Process it all the same: a crash now goes uncounted (the next start
                # isolates it again) rather than a ledger outage burning attempts.
                self.component.logger.warning(
                    "processing suspect seq %s without a marker: %s", track.sequence, exc
                )
            else:
                track.stored = True
                track.clean = False
            track.alone = True
            try:
                yield
            finally:
                track.alone = False
                self.suspects.pop(delivery, None)
                with anyio.CancelScope(shield=True):
                    await self._clear_marker(key, track)

    async def _clear_marker(self, key: str, track: _Track) -> None:
        """The processing ended without a crash: the marker goes before other work starts."""
        if not track.stored:
            return
        try:
            if track.settled or track.attempts == 0:
                await self.ledger.delete(key)
                track.stored = False
            elif not track.clean:  # else `failed` already replaced it with an unmarked one
                await self.ledger.write(key, _entry(track))
        except RetryableError as exc:
            self.component.logger.warning(
                "could not clear the isolation marker of seq %s: %s", track.sequence, exc
            )

    def _remember(self, track: _Track) -> None:
        tracks = self.tracks
        tracks[track.sequence] = track
        tracks.move_to_end(track.sequence)
        if len(tracks) > _REMEMBERED:
            tracks.popitem(last=False)


def _entry(track: _Track, owner: str = "") -> _Entry:
    return _Entry(
        attempts=track.attempts,
        crashes=track.crashes,
        owner=owner,
        error=track.error,
        body=track.body,
    )


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()
