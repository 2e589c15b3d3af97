"""Reading and trimming a stream's stored messages, for the dead-letter tools.

Every function raises busway's errors (`JetStreamError` with JetStream's code, or
`BusUnavailable`); a message that is not there is `None`, not an error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import PubAck

from busway._nats import internals
from busway._nats.errors import TRANSPORT_ERRORS, map_exceptions, publish_error

__all__ = [
    "NO_MESSAGE",
    "StoredMessage",
    "StreamState",
    "delete_message",
    "first_sequence_since",
    "publish_pipelined",
    "publish_unawaited",
    "purge_subject",
    "stored_message",
    "stream_state",
]

NO_MESSAGE = 10037
"""JetStream's "no message found" error code (STREAM.MSG.GET)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A message as the stream stores it."""

    seq: int
    subject: str
    time: datetime | None
    data: bytes
    raw_headers: str | bytes | None
    """The base64 `NATS/1.0` header block as JetStream sent it (parse it yourself)."""


@dataclass(frozen=True, slots=True)
class StreamState:
    """A stream's bounds, and per subject counts when asked for a filter."""

    first_seq: int
    last_seq: int
    subjects: dict[str, int]


async def stream_state(
    js: JetStreamContext, stream: str, *, subjects_filter: str | None = None
) -> StreamState:
    """The state of `stream` (with per-subject counts for `subjects_filter`)."""
    with map_exceptions(f"cannot read stream {stream!r}"):
        state = (await js.stream_info(stream, subjects_filter=subjects_filter)).state
    return StreamState(state.first_seq, state.last_seq, dict(state.subjects or {}))


async def stored_message(
    js: JetStreamContext,
    stream: str,
    seq: int,
    *,
    subject: str | None = None,
    next: bool = False,
) -> StoredMessage | None:
    """The message at `seq` (with `next`, the first at or after it on `subject`), or None."""
    with map_exceptions(f"cannot read message {seq} of stream {stream!r}"):
        try:
            if next:
                raw = await js.get_msg(stream, seq=seq, subject=subject, next=True)
            else:
                raw = await js.get_msg(stream, seq=seq)
        except nats.js.errors.APIError as exc:
            if exc.err_code == NO_MESSAGE:
                return None
            raise
    return StoredMessage(
        seq=raw.seq or 0,
        subject=raw.subject or "",
        time=raw.time,
        data=raw.data if isinstance(raw.data, bytes) else b"",
        raw_headers=raw.hdrs,
    )


async def delete_message(js: JetStreamContext, stream: str, seq: int) -> None:
    """Delete message `seq` of `stream`, without a secure erase where nats-py allows it."""
    with map_exceptions(f"cannot delete message {seq} of stream {stream!r}"):
        await internals.delete_without_erase(js, stream, seq)


async def purge_subject(js: JetStreamContext, stream: str, subject: str, *, below: int) -> None:
    """Purge the messages of `subject` in `stream` with a sequence below `below`."""
    with map_exceptions(f"cannot purge {subject!r} from stream {stream!r}"):
        await js.purge_stream(stream, subject=subject, seq=below)


async def publish_pipelined(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    *,
    headers: dict[str, str],
    timeout: float,
) -> asyncio.Future[PubAck]:
    """Send now (waiting at most `timeout` for room in the publish window), confirm later
    (`await_pub_ack`); PublishError if it could not be sent."""
    try:
        return await js.publish_async(subject, data, headers=headers, wait_stall=timeout)
    except TRANSPORT_ERRORS as exc:
        raise publish_error(exc, subject) from exc


async def first_sequence_since(
    client: NatsClient, stream: str, moment: datetime, *, timeout: float = 5.0
) -> int | None:
    """The sequence of the first message `stream` stored at or after `moment` (None: none).

    One `STREAM.MSG.GET` request with `start_time` (nats-server 2.11+): the server finds it in
    its index, so `busway audit --since 1h` does not walk a large stream from the start.
    """
    request = {"start_time": moment.astimezone(UTC).isoformat().replace("+00:00", "Z")}
    with map_exceptions(f"cannot read stream {stream!r}"):
        reply = await client.request(
            f"$JS.API.STREAM.MSG.GET.{stream}", json.dumps(request).encode(), timeout=timeout
        )
        answer = json.loads(reply.data)
        error = answer.get("error")
        if error is not None:
            if error.get("err_code") == NO_MESSAGE:
                return None
            raise nats.js.errors.APIError.from_error(error)
    sequence = answer.get("message", {}).get("seq")
    return int(sequence) if sequence else None


async def publish_unawaited(
    js: JetStreamContext,
    subject: str,
    data: bytes,
    message_id: str,
    on_failure: Callable[[BaseException], None],
) -> None:
    """Send `data` with `Nats-Msg-Id: message_id` and do not wait for its PubAck.

    For records whose loss must be seen but must not hold a message back (audit records):
    one pipelined publish; a refusal, a missing PubAck or a send that failed is passed to
    `on_failure` (from the event loop's callback, so it must not block).
    """
    future = await internals.publish_output(js, subject, data, message_id, None)

    def done(result: asyncio.Future[PubAck]) -> None:
        if result.cancelled():
            on_failure(TimeoutError("no PubAck"))
        elif (error := result.exception()) is not None:
            on_failure(error)

    future.add_done_callback(done)
