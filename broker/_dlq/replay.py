"""Changing dead letters: replay them (republish, then delete) or purge them.

Replay is at-least-once and never loses a dead letter: the body is republished (to its original
subject or another) with a fresh deterministic `Nats-Msg-Id`, and the dead letter is deleted
only after JetStream confirmed the copy. A replay interrupted between the two, or two replays
running at once, store the copy once (within the target stream's `duplicate_window`): the run
whose copy JetStream stored reports it replayed, the other skipped.

A copy replayed to its original subject is addressed to the route or sink that gave up on it
(`Busway-Replay-For`): the other consumers of that subject ack it unprocessed, so a healthy
sibling does not get the message twice. Selection and reading are `busway._dlq.read`'s.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import socket
from typing import TYPE_CHECKING, Unpack

import anyio
import orjson

from busway._config.model import Config
from busway._dlq.read import (
    _DELETE_FAILED,
    _WINDOW,
    DeadLetter,
    DeadLetterError,
    DeadLetterFilters,
    ReplayOutcome,
    ReplayReport,
    _errors,
    _Selection,
    _walk,
    iter_dead_letters,
)
from busway._errors import BusUnavailable, JetStreamError, PublishError
from busway._nats.jetstream import await_pub_ack, publish_confirmed
from busway._nats.streams import (
    NO_MESSAGE,
    delete_message,
    publish_pipelined,
    purge_subject,
    stream_state,
)
from busway._observe.audit import replay_record
from busway.routers.subject import covers, is_valid_subject

if TYPE_CHECKING:
    from busway._nats.types import JetStream, PubAck

__all__ = ["purge_dead_letters", "replay_dead_letters"]

logger = logging.getLogger("busway.dlq")


async def replay_dead_letters(
    js: JetStream,
    config: Config,
    *,
    to_subject: str | None = None,
    dry_run: bool = False,
    limit: int | None = None,
    timeout: float | None = None,
    why: str | None = None,
    **filters: Unpack[DeadLetterFilters],
) -> ReplayReport:
    """Republish the selected dead letters, then delete each one JetStream stored again.

    With `[audit] enabled`, each replayed letter is recorded in the audit stream: the
    operating system user and host running the replay, and `why` (`busway dlq replay --why`).
    A record that could not be stored is listed in `report.unaudited`.

    Each goes to `to_subject`, or to its original subject; a dead letter without one (a
    source's) is skipped unless `to_subject` is given. Headers: see `DeadLetter.replay_headers`.
    Oldest first, in windows of pipelined publishes on one connection, so their order is kept.
    `dry_run` only reports where each would go. `timeout` bounds each PubAck (default `[nats]
    publish_timeout`).
    """
    prefix = config.dead_letter.subject_prefix
    if to_subject is not None:
        if not is_valid_subject(to_subject, wildcards=False):
            raise ValueError(f"replay target {to_subject!r} is not a subject without wildcards")
        if covers(f"{prefix}.>", to_subject):
            raise ValueError(
                f"replay target {to_subject!r} is a dead-letter subject ({prefix}.>): "
                "replaying there would only move dead letters around"
            )
    wait = float(timeout if timeout is not None else config.nats.publish_timeout)
    report = ReplayReport(dry_run=dry_run)
    addressed = to_subject is None
    window: list[tuple[DeadLetter, str]] = []
    audit = _ReplayAudit(js, config, why, wait) if config.audit.enabled and not dry_run else None
    async for letter in iter_dead_letters(js, config, limit=limit, **filters):
        target = to_subject or letter.original_subject
        if target is None:
            report.skipped.append(
                _outcome(letter, None, "no original subject (a source's dead letter): use --to")
            )
        elif covers(f"{prefix}.>", target) or not is_valid_subject(target, wildcards=False):
            report.skipped.append(
                _outcome(letter, target, "the original subject is not a subject to replay to")
            )
        elif to_subject is None and (unread := _unread_by_addressee(config, letter, target)):
            report.skipped.append(_outcome(letter, target, unread))
        elif dry_run:
            report.replayed.append(_outcome(letter, target, "dry run: not published"))
        else:
            window.append((letter, target))
            if len(window) >= _WINDOW:
                await _replay_window(js, window, wait, report, addressed=addressed, audit=audit)
                window.clear()
    if window:
        await _replay_window(js, window, wait, report, addressed=addressed, audit=audit)
    return report


class _ReplayAudit:
    """Records replays in the audit stream: who (user@host), what (the letter), why."""

    def __init__(self, js: JetStream, config: Config, why: str | None, timeout: float) -> None:
        self._js = js
        self._subject = f"{config.audit.subject_prefix}.replay."
        self._why = why
        self._timeout = timeout
        try:
            self._user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry and no LOGNAME (a bare container)
            self._user = "unknown"
        self._host = socket.gethostname()

    async def record(
        self, letter: DeadLetter, target: str, ack: PubAck, report: ReplayReport
    ) -> None:
        record = replay_record(
            user=self._user,
            host=self._host,
            why=self._why,
            component=letter.component,
            dead_letter_stream=letter.stream,
            dead_letter_seq=letter.seq,
            reason=letter.reason,
            message_id=letter.original_id,
            original_subject=letter.original_subject,
            target=target,
            stored_stream=ack.stream,
            stored_seq=ack.seq or 0,
        )
        message_id = f"audit:replay:{letter.stream}:{letter.seq}"
        try:
            await publish_confirmed(
                self._js,
                self._subject + letter.component,
                orjson.dumps(record),
                headers={"Nats-Msg-Id": message_id},
                timeout=self._timeout,
            )
        except PublishError as exc:
            logger.warning(
                "replay of dead letter %d not recorded in the audit: %s", letter.seq, exc
            )
            report.unaudited.append(_outcome(letter, target, f"audit record not stored: {exc}"))


async def _replay_window(
    js: JetStream,
    window: list[tuple[DeadLetter, str]],
    timeout: float,
    report: ReplayReport,
    *,
    addressed: bool,
    audit: _ReplayAudit | None = None,
) -> None:
    """Publish every letter of `window`, await the PubAcks, then delete the stored ones.

    `addressed` copies (to their original subject) are for the failed component alone.
    """
    sent: list[tuple[DeadLetter, str, asyncio.Future[PubAck]]] = []
    for letter, target in window:
        headers = letter.replay_headers(addressed=addressed)
        try:
            future = await publish_pipelined(
                js, target, letter.body, headers=headers, timeout=timeout
            )
        except PublishError as exc:
            report.failed.append(_outcome(letter, target, str(exc)))
        else:
            sent.append((letter, target, future))
    stored: list[tuple[DeadLetter, str, PubAck]] = []
    for letter, target, future in sent:
        try:
            ack = await await_pub_ack(future, target, timeout)
        except PublishError as exc:
            report.failed.append(_outcome(letter, target, str(exc)))
        else:
            stored.append((letter, target, ack))
    deleted = await _delete_all(js, [letter for letter, _, _ in stored])
    for (letter, target, ack), problem in zip(stored, deleted, strict=True):
        where = f"stored as {ack.stream} seq {ack.seq}"
        if problem is None and ack.duplicate:
            # Another replay (running now, or interrupted before its delete) stored this copy
            # first: that run replayed it, this one only made sure the dead letter is gone.
            report.skipped.append(
                _outcome(
                    letter,
                    target,
                    f"already replayed by another run ({where}): deduplicated, not stored again",
                    ack.stream,
                    ack.seq,
                )
            )
        elif problem is None:
            report.replayed.append(_outcome(letter, target, where, ack.stream, ack.seq))
            if audit is not None:
                await audit.record(letter, target, ack, report)
        else:
            report.failed.append(
                _outcome(
                    letter,
                    target,
                    f"{where}, but deleting the dead letter failed ({problem}): a new replay "
                    "within the target's duplicate_window is deduplicated",
                    ack.stream,
                    ack.seq,
                )
            )


async def _delete_all(js: JetStream, letters: list[DeadLetter]) -> list[str | None]:
    """Delete `letters` concurrently; per letter None, or why it could not be deleted.

    A letter already gone (deleted by a concurrent purge or replay) counts as deleted.
    """
    problems: list[str | None] = [None] * len(letters)

    async def delete(index: int, letter: DeadLetter) -> None:
        try:
            await delete_message(js, letter.stream, letter.seq)
        except JetStreamError as exc:
            if not _already_gone(exc):
                problems[index] = f"{exc.description} (code {exc.code})"
        except BusUnavailable as exc:
            cause = exc.__cause__ or exc
            problems[index] = str(cause) or type(cause).__name__

    async with anyio.create_task_group() as tg:
        for index, letter in enumerate(letters):
            tg.start_soon(delete, index, letter)
    return problems


def _already_gone(exc: JetStreamError) -> bool:
    """True if JetStream refused a delete because the message is not there (any more).

    `STREAM.MSG.DELETE` answers 10057 with the description "no message found" for a message
    deleted before (`STREAM.MSG.GET` says 10037); 10057 with another description is a real
    failure (e.g. "stream store EOF" for a sequence past the end).
    """
    if exc.code == NO_MESSAGE:
        return True
    return exc.code == _DELETE_FAILED and "no message found" in exc.description


def _unread_by_addressee(config: Config, letter: DeadLetter, target: str) -> str | None:
    """Why nothing would process `letter` replayed to `target` for its component, or None.

    A replay to the original subject is processed by the route or sink named in it alone; if
    that component is gone from the config (or no longer reads `target`), every consumer
    would ack the copy unprocessed and the dead letter would be lost.
    """
    if letter.addressee is None:
        return None
    consumers = config.routes if letter.kind == "route" else config.sinks
    for consumer in consumers:
        if consumer.name == letter.component:
            if covers(consumer.from_, target):
                return None
            return (
                f"{letter.kind} {letter.component!r} no longer reads {target!r} "
                f"(its `from` is {consumer.from_!r}): replay with --to SUBJECT"
            )
    return (
        f"{letter.kind} {letter.component!r} is not in this config, so nothing would process "
        "the replay: replay with --to SUBJECT"
    )


def _outcome(
    letter: DeadLetter,
    target: str | None,
    detail: str,
    stream: str | None = None,
    seq: int | None = None,
) -> ReplayOutcome:
    return ReplayOutcome(
        seq=letter.seq,
        component=letter.component,
        target=target,
        detail=detail,
        stored_stream=stream,
        stored_seq=seq,
    )


async def purge_dead_letters(
    js: JetStream,
    config: Config,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    **filters: Unpack[DeadLetterFilters],
) -> int:
    """Delete the selected dead letters; the number deleted (or, in a dry run, selected).

    Without filters every dead letter goes. With only `component`, its whole subject is
    purged in one request; otherwise the selected messages are deleted, a window at a time.
    Raises DeadLetterError if one cannot be deleted (those before it are gone).
    """
    selection = _Selection(config, filters)
    prefix = config.dead_letter.subject_prefix
    default_subject = f"{prefix}.{selection.component}" if selection.component else f"{prefix}.>"
    whole_subject = (
        selection.only_component or selection.nothing
    ) and selection.filter_subject == default_subject
    if whole_subject and limit is None:
        return await _purge_subject(js, selection.stream, selection.filter_subject, dry_run)
    count = 0
    window: list[DeadLetter] = []
    async for letter in _walk(js, selection, limit):
        count += 1
        if not dry_run:
            window.append(letter)
            if len(window) >= _WINDOW:
                await _delete_or_raise(js, window)
                window.clear()
    if window:
        await _delete_or_raise(js, window)
    return count


async def _delete_or_raise(js: JetStream, letters: list[DeadLetter]) -> None:
    for letter, problem in zip(letters, await _delete_all(js, letters), strict=True):
        if problem is not None:
            raise DeadLetterError(
                f"cannot delete dead letter {letter.seq} from stream {letter.stream!r}: {problem}"
            )


async def _purge_subject(js: JetStream, stream: str, subject: str, dry_run: bool) -> int:
    """Purge `subject` up to the stream's current last sequence; the number purged.

    The count and the bound come from one stream-info answer, so a dead letter stored while
    this runs is neither purged nor counted.
    """
    with _errors(stream):
        state = await stream_state(js, stream, subjects_filter=subject)
        count = sum(state.subjects.values())
        if count and not dry_run:
            await purge_subject(js, stream, subject, below=state.last_seq + 1)
    return count
