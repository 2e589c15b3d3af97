"""Dead-letter tooling: list, show, replay and purge what routes, sinks and sources gave up on.

Every component dead-letters to `<[dead_letter] subject_prefix>.<component name>` in the
`[dead_letter] stream` (a route or sink with its own `dead_letter` subject uses that one). A
dead letter keeps the body untouched and says in `Busway-*` headers what failed and where
(`busway._delivery.contract.dead_letter_headers`, `SourceContext.dead_letter`).

    async with await nats.connect(url) as nc:
        js = nc.jetstream()
        for letter in await list_dead_letters(js, config, component="orders", reason="decode"):
            print(letter.seq, letter.error)
        report = await replay_dead_letters(js, config, component="orders", to_subject="in.fixed")

Reading walks the stream with `STREAM.MSG.GET` "next message at or after sequence n matching
the subject filter" requests: one message in memory at a time, gaps from deleted messages
skipped by the server, the component's subject filtered server-side, and no consumer left
behind. Every walk stops at the stream's last sequence as it was when the walk began, so a
message replayed onto a route that dead-letters it again is not picked up by the same replay.

Replay and purge are in `busway._dlq.replay`.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import re
from collections.abc import AsyncIterator, Collection, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypedDict, Unpack

import msgspec

from busway._config.model import Config
from busway._delivery.contract import REPLAY_FOR_HEADER, REPLAY_MSG_ID_HEADER, REPLAY_ORIGIN_HEADER
from busway._errors import BusUnavailable, BuswayError, JetStreamError
from busway._nats.streams import StoredMessage, stored_message, stream_state
from busway._routing.hops import HOPS_HEADER
from busway.routers.subject import covers, is_valid_subject

if TYPE_CHECKING:
    from busway._nats.types import JetStream

__all__ = [
    "FAILURE_HEADERS",
    "REPLAY_COUNT_HEADER",
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterFilters",
    "ReplayOutcome",
    "ReplayReport",
    "get_dead_letter",
    "iter_dead_letters",
    "list_dead_letters",
]

REPLAY_COUNT_HEADER = "Busway-Replay-Count"

FAILURE_HEADERS = frozenset(
    {
        HOPS_HEADER,  # a replay starts a fresh count (a `hop_limit` dead letter could not pass)
        "Busway-Component",
        "Busway-Component-Kind",
        "Busway-Error-Reason",
        "Busway-Error",
        "Busway-Original-Subject",
        "Busway-Original-Stream",
        "Busway-Original-Sequence",
        "Busway-Original-Msg-Id",
        "Busway-Attempts",
        "Busway-First-Failed-At",
        "Busway-Failed-At",
        "Busway-Stage",
        "Busway-Expression",
        "Busway-Validation-Path",
        "Busway-Origin",
    }
)
"""Headers that describe a failure: dropped from a replayed message (its next failure, if any,
writes them afresh). Everything else, e.g. `Busway-Reply-To` or a correlation id, is kept."""

# Header families that describe a failure too, so headers added later (first/last failure
# time...) are dropped on replay without a change here.
_FAILURE_PREFIXES = ("Busway-Error-", "Busway-Original-", "Busway-First-", "Busway-Last-")
_REPLAY_ADDRESSING = frozenset({REPLAY_FOR_HEADER, REPLAY_MSG_ID_HEADER, REPLAY_ORIGIN_HEADER})
_CONSUMER_KINDS = frozenset({"route", "sink"})
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_DELETE_FAILED = 10057  # STREAM.MSG.DELETE's code for any failure; the description says which
# Replays and deletes in flight at once: enough to hide round trips (and, with
# `sync_interval: always`, to share fsyncs), few enough to bound memory and a failure's reach.
_WINDOW = 64


class DeadLetterError(BuswayError):
    """The dead-letter stream cannot be read or changed (missing, JetStream down, refused)."""


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One dead letter: where it is, what failed, and the untouched body.

    `original_*` locate the message a route or sink failed on; a source's dead letter has none
    and names its `origin` (a file and line, an HTTP request...) instead.
    """

    stream: str
    seq: int
    time: datetime
    """When the dead letter was stored (UTC)."""
    subject: str
    """The dead letter's own subject, `<subject_prefix>.<component>`."""
    component: str
    kind: str
    """`route`, `sink`, `source`, or `unknown` for a message busway did not write."""
    reason: str
    error: str
    original_subject: str | None = None
    original_stream: str | None = None
    original_seq: int | None = None
    origin: str | None = None
    attempts: int | None = None
    first_failed_at: datetime | None = None
    """When the first attempt failed (routes and sinks)."""
    failed_at: datetime | None = None
    """When the last attempt failed, i.e. when it was given up."""
    replay_count: int = 0
    """How often this message was replayed before (its `Busway-Replay-Count` header)."""
    headers: dict[str, str] = {}
    body: bytes = b""

    @property
    def addressee(self) -> str | None:
        """`<kind>:<component>` of the route or sink that gave up on it (None for others)."""
        return f"{self.kind}:{self.component}" if self.kind in _CONSUMER_KINDS else None

    @property
    def original_id(self) -> str | None:
        """The identity a sink knew the failed message by: its `Nats-Msg-Id`, else
        `<stream>:<sequence>`; None for a source's dead letter (there was no message)."""
        found = self.headers.get("Busway-Original-Msg-Id")
        if found:
            return found
        if self.original_stream and self.original_seq is not None:
            return f"{self.original_stream}:{self.original_seq}"
        return None

    def replay_headers(self, *, addressed: bool = True) -> dict[str, str]:
        """The headers a replay of this dead letter is published with.

        The failure headers and NATS' own are dropped; the replay counter goes up by one; the
        `Nats-Msg-Id` is fresh but deterministic, so replaying the same dead letter twice (a
        crash between the PubAck and the delete, two replays at once) stores it once.
        `Busway-Replay-Msg-Id` carries the original identity, which sinks keep as their
        idempotency key; `Busway-Replay-Origin` the original place, from which a route derives
        the same output ids as on the first attempt. `addressed` (a replay to the original
        subject) adds `Busway-Replay-For`, so only the component that failed processes the copy.
        """
        headers = {
            key: value
            for key, value in self.headers.items()
            if key not in FAILURE_HEADERS
            and not key.startswith(_FAILURE_PREFIXES)
            and not key.startswith("Nats-")
            and key not in _REPLAY_ADDRESSING
        }
        count = self.replay_count + 1
        headers[REPLAY_COUNT_HEADER] = str(count)
        headers["Nats-Msg-Id"] = f"replay:{self.stream}:{self.seq}:{count}"
        original = self.original_id
        if original is not None:
            headers[REPLAY_MSG_ID_HEADER] = original
        origin = self.headers.get(REPLAY_ORIGIN_HEADER) or (
            f"{self.original_stream}:{self.original_seq}"
            if self.original_stream and self.original_seq is not None
            else None
        )
        if origin is not None:
            headers[REPLAY_ORIGIN_HEADER] = origin
        addressee = self.addressee
        if addressed and addressee is not None:
            headers[REPLAY_FOR_HEADER] = addressee
        return headers


class ReplayOutcome(msgspec.Struct, frozen=True, kw_only=True):
    """What replay did with one dead letter."""

    seq: int
    component: str
    target: str | None
    """The subject it was (or, in a dry run, would be) republished to."""
    detail: str = ""
    stored_stream: str | None = None
    stored_seq: int | None = None


class ReplayReport(msgspec.Struct, kw_only=True):
    """The outcome of `replay_dead_letters`: every selected dead letter is in one list.

    `replayed` were stored on their target and deleted from the dead-letter stream (in a dry
    run: would be); `failed` stay dead letters (or, rarely, were stored but could not be
    deleted: the detail says so); `skipped` had nowhere to go (no original subject, or a
    dead-letter subject).
    """

    dry_run: bool = False
    replayed: list[ReplayOutcome] = []
    failed: list[ReplayOutcome] = []
    skipped: list[ReplayOutcome] = []
    unaudited: list[ReplayOutcome] = []
    """Replayed, but its `[audit]` record could not be stored (also in `replayed`)."""


class DeadLetterFilters(TypedDict, total=False):
    """Which dead letters an operation selects; every given filter must match (AND).

    `subject` matches the original subject and may use `*` and `>`; `since`/`until` bound the
    time the dead letter was stored (inclusive); `error_contains` is a case-insensitive
    substring of the error; `sequences` picks dead letters by their sequence in the stream.
    """

    component: str | None
    reason: str | None
    subject: str | None
    since: datetime | None
    until: datetime | None
    error_contains: str | None
    sequences: Collection[int] | None


class _Selection:
    """`DeadLetterFilters` checked once, plus where in JetStream to look."""

    def __init__(self, config: Config, filters: DeadLetterFilters) -> None:
        self.component = filters.get("component")
        self.reason = filters.get("reason")
        self.subject = filters.get("subject")
        self.since = filters.get("since")
        self.until = filters.get("until")
        error = filters.get("error_contains")
        self.error = error.casefold() if error else None
        sequences = filters.get("sequences")
        self.sequences = sorted(set(sequences)) if sequences is not None else None
        for key in ("since", "until"):
            moment = filters.get(key)
            if isinstance(moment, datetime) and moment.tzinfo is None:
                raise ValueError(f"`{key}` needs a timezone-aware datetime, got {moment!r}")
        if self.component is not None and not _COMPONENT_NAME.match(self.component):
            raise ValueError(
                f"component {self.component!r} is not a route, sink or source name "
                "(1-64 letters, digits, '-' or '_')"
            )
        if self.subject is not None and not is_valid_subject(self.subject, wildcards=True):
            raise ValueError(f"subject filter {self.subject!r} is not a valid NATS subject")
        self.stream, self.filter_subject = _location(config, self.component)

    @property
    def only_component(self) -> bool:
        """True when the component is the only filter: its whole subject is selected."""
        return self.component is not None and self._no_other_filter

    @property
    def nothing(self) -> bool:
        """True when no filter is given: every dead letter is selected."""
        return self.component is None and self._no_other_filter

    @property
    def _no_other_filter(self) -> bool:
        return not any((self.reason, self.subject, self.since, self.until, self.error)) and (
            self.sequences is None
        )

    def matches(self, letter: DeadLetter) -> bool:
        """True if `letter` passes every filter."""
        if self.component is not None and letter.component != self.component:
            return False
        if self.reason is not None and letter.reason != self.reason:
            return False
        if self.subject is not None and (
            letter.original_subject is None or not covers(self.subject, letter.original_subject)
        ):
            return False
        if self.error is not None and self.error not in letter.error.casefold():
            return False
        if self.since is not None and letter.time < self.since:
            return False
        return self.until is None or letter.time <= self.until


def _location(config: Config, component: str | None) -> tuple[str, str]:
    """(stream, subject filter) holding the dead letters of `component` (or of all)."""
    settings = config.dead_letter
    if component is None:
        return settings.stream, f"{settings.subject_prefix}.>"
    for consumer in (*config.routes, *config.sinks):
        if consumer.name == component and consumer.dead_letter:
            stream = config.stream_for(consumer.dead_letter)
            if stream is not None:
                return stream.name, consumer.dead_letter
    return settings.stream, f"{settings.subject_prefix}.{component}"


# ---------------------------------------------------------------------------------------------
# Reading


async def iter_dead_letters(
    js: JetStream,
    config: Config,
    *,
    limit: int | None = None,
    **filters: Unpack[DeadLetterFilters],
) -> AsyncIterator[DeadLetter]:
    """Yield the dead letters `filters` select, oldest first, at most `limit` of them.

    Holds one message at a time, so it suits a dead-letter stream of any size.
    Raises DeadLetterError if the stream cannot be read, ValueError for an invalid filter.
    """
    selection = _Selection(config, filters)
    async for letter in _walk(js, selection, limit):
        yield letter


async def list_dead_letters(
    js: JetStream,
    config: Config,
    *,
    limit: int | None = None,
    **filters: Unpack[DeadLetterFilters],
) -> list[DeadLetter]:
    """The dead letters `filters` select, oldest first, at most `limit` of them."""
    return [letter async for letter in iter_dead_letters(js, config, limit=limit, **filters)]


async def get_dead_letter(
    js: JetStream, config: Config, seq: int, *, stream: str | None = None
) -> DeadLetter | None:
    """The message at `seq` of the dead-letter stream (or `stream`), None if there is none."""
    name = stream or config.dead_letter.stream
    if seq < 1:
        return None
    with _errors(name):
        raw = await stored_message(js, name, seq)
    return None if raw is None else _decode(name, raw)


async def _walk(
    js: JetStream, selection: _Selection, limit: int | None
) -> AsyncIterator[DeadLetter]:
    stream = selection.stream
    with _errors(stream):
        state = await stream_state(js, stream)
    last = state.last_seq
    found = 0
    if limit is not None and limit <= 0:
        return
    if selection.sequences is not None:
        candidates: AsyncIterator[DeadLetter] = _by_sequence(js, selection, last)
    else:
        first = max(state.first_seq, 1)
        if selection.since is not None:
            first = await _first_since(js, selection, first, last)
        candidates = _scan(js, selection, first, last)
    async for letter in candidates:
        if selection.until is not None and letter.time > selection.until:
            return  # stored times only grow along the stream
        if not selection.matches(letter):
            continue
        yield letter
        found += 1
        if limit is not None and found >= limit:
            return


async def _scan(
    js: JetStream, selection: _Selection, first: int, last: int
) -> AsyncIterator[DeadLetter]:
    seq = first
    while seq <= last:
        raw = await _next(js, selection.stream, selection.filter_subject, seq)
        if raw is None or raw.seq > last:
            return
        yield _decode(selection.stream, raw)
        seq = raw.seq + 1


async def _by_sequence(
    js: JetStream, selection: _Selection, last: int
) -> AsyncIterator[DeadLetter]:
    assert selection.sequences is not None
    for seq in selection.sequences:
        if seq < 1 or seq > last:
            continue
        raw = await _next(js, selection.stream, selection.filter_subject, seq)
        if raw is not None and raw.seq == seq:
            yield _decode(selection.stream, raw)


async def _first_since(js: JetStream, selection: _Selection, first: int, last: int) -> int:
    """The lowest sequence whose next matching message was stored at or after `since`.

    A binary search over sequences (stored times grow along a stream), so `--since 1h` on a
    large dead-letter stream costs a few dozen requests instead of a walk from the start.
    """
    assert selection.since is not None
    low, high = first, last + 1
    while low < high:
        middle = (low + high) // 2
        raw = await _next(js, selection.stream, selection.filter_subject, middle)
        if raw is None or raw.seq > last or (raw.time is not None and raw.time >= selection.since):
            high = middle
        else:
            low = raw.seq + 1
    return low


async def _next(js: JetStream, stream: str, subject: str, seq: int) -> StoredMessage | None:
    """The first message at or after `seq` on `subject` (a pattern), or None."""
    with _errors(stream):
        return await stored_message(js, stream, seq, subject=subject, next=True)


def _decode(stream: str, raw: StoredMessage) -> DeadLetter:
    headers = _parse_headers(raw.raw_headers)
    subject = raw.subject
    kind = headers.get("Busway-Component-Kind", "unknown")
    return DeadLetter(
        stream=stream,
        seq=raw.seq,
        time=raw.time or datetime.fromtimestamp(0, UTC),
        subject=subject,
        component=headers.get("Busway-Component") or subject.rpartition(".")[2],
        kind=kind,
        reason=headers.get("Busway-Error-Reason", ""),
        error=headers.get("Busway-Error", ""),
        original_subject=headers.get("Busway-Original-Subject"),
        original_stream=headers.get("Busway-Original-Stream"),
        original_seq=_int(headers.get("Busway-Original-Sequence")),
        origin=headers.get("Busway-Origin"),
        attempts=_int(headers.get("Busway-Attempts")),
        first_failed_at=_time(headers.get("Busway-First-Failed-At")),
        failed_at=_time(headers.get("Busway-Failed-At")),
        replay_count=_int(headers.get(REPLAY_COUNT_HEADER)) or 0,
        headers=headers,
        body=raw.data,
    )


def _parse_headers(encoded: object) -> dict[str, str]:
    """Headers from the base64 `NATS/1.0` block of a `STREAM.MSG.GET` answer, as UTF-8.

    nats-py's own parsing (the `email` module) turns non-ASCII values, such as an error
    message cut with `…`, into `Header` objects; busway writes headers as UTF-8.
    """
    if not isinstance(encoded, str | bytes) or not encoded:
        return {}
    try:
        block = base64.b64decode(encoded)
    except (binascii.Error, ValueError):
        return {}
    headers: dict[str, str] = {}
    for line in block.split(b"\r\n")[1:]:
        key, sep, value = line.partition(b":")
        if sep and key:
            headers[key.decode("utf-8", "replace").strip()] = value.decode(
                "utf-8", "replace"
            ).strip()
    return headers


def _time(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


@contextlib.contextmanager
def _errors(stream: str) -> Iterator[None]:
    """Translate NATS failures on `stream` into DeadLetterError, saying what to check."""
    try:
        yield
    except JetStreamError as exc:
        if exc.not_found:
            raise DeadLetterError(
                f"stream {stream!r} does not exist on this server: nothing was dead-lettered "
                "yet, or the config's [dead_letter] stream is another one"
            ) from exc
        if exc.status == 503:
            raise DeadLetterError(
                "JetStream does not answer: is JetStream enabled on this server?"
            ) from exc
        raise DeadLetterError(
            f"JetStream refused a request on stream {stream!r}: {exc.description} (code {exc.code})"
        ) from exc
    except BusUnavailable as exc:
        cause = exc.__cause__ or exc
        raise DeadLetterError(
            f"a request on stream {stream!r} failed: {cause or type(cause).__name__}"
        ) from exc
