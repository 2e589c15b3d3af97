"""Every use of nats-py's private attributes, each with a fallback to the public path.

busway reaches under nats-py's public API in a few measured or necessary places:

* `Client._server_info`: the server's name (is it our embedded one?), whether it is clustered
  and how many servers it announces; without it, not checked;
* `Client._transport`: close a socket an aborted connect left open; without it, `close()` only;
* `Client._inbox_prefix`, `JetStreamContext._handle_async_reply`, `._publish_async_futures`:
  a refused async publish fails its future at once; without them, it times out;
* `JetStreamContext._publish_async_futures`: fail the PubAcks a reconnect lost
  (`fail_unconfirmed`); without it, each times out;
* `JetStreamContext._handle_async_reply`, `._publish_async_futures`: the time of the last
  PubAck and how many wait (`PubAckWatch`, "no PubAck for Ns" on /readyz); without them, no
  such readiness reason (pings still notice a dead server);
* `JetStreamContext._publish_async_pending_semaphore`: pass `wait_stall` only when the publish
  window is full; without it, always passed (slower);
* `publish_output`'s fast path (`Client._nuid`, `._send_command`, `._flush_queue`...): the
  `HPUB` frame in one bytes-format; without them, `publish_async`;
* `JetStreamContext._nc`, `._prefix`, `._timeout`: delete a message without a secure erase;
  without them, `delete_msg` (which erases).
* `Client._process_info`: refuse, before CONNECT is sent, a server whose INFO does not ask for
  TLS when busway is configured for TLS (`require_tls`); without it, the connection is checked
  right after connecting (the CONNECT, credentials included, may then have gone in clear).

`check(client, js)` runs once per connection (`busway._nats.jetstream.jetstream`): a missing
attribute is logged once at WARNING, by name, and its feature takes the public path from then
on. `tests/test_nats_internals.py` fails, naming the attribute and the nats-py version, when an
upgrade renames one, so the fallback is never the silent normal. nats-py is pinned <2.17.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from secrets import token_hex
from typing import Any

import nats.aio.client as _client_module
import nats.js.errors
import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from busway._nats.errors import TRANSPORT_ERRORS, publish_error

__all__ = [
    "CLIENT_ATTRIBUTES",
    "JETSTREAM_ATTRIBUTES",
    "TlsNotOffered",
    "available",
    "check",
    "close_transport",
    "delete_without_erase",
    "fail_pending_publishes",
    "missing_attributes",
    "publish_output",
    "publish_window_full",
    "require_tls",
    "resolve_refusals_at_once",
    "server_name",
    "set_fast_publish",
]

logger = logging.getLogger("busway.nats")

CLIENT_ATTRIBUTES = (
    "_server_info",
    "_transport",
    "_inbox_prefix",
    "_max_payload",
    "_nuid",
    "_send_command",
    "_flush_queue",
    "_flush_pending",
    "_process_info",
)
JETSTREAM_ATTRIBUTES = (
    "_nc",
    "_prefix",
    "_timeout",
    "_async_reply_prefix",
    "_handle_async_reply",
    "_publish_async_futures",
    "_publish_async_pending_semaphore",
    "_publish_async_completed_event",
)

# What the features need; a feature whose attributes are all present takes its private path.
_FAST_PUBLISH = (
    "Client._max_payload",
    "Client._nuid",
    "Client._send_command",
    "Client._flush_queue",
    "Client._flush_pending",
    "JetStreamContext._nc",
    "JetStreamContext._async_reply_prefix",
    "JetStreamContext._publish_async_futures",
    "JetStreamContext._publish_async_pending_semaphore",
    "JetStreamContext._publish_async_completed_event",
)

_VERSION = _client_module.__version__

_missing: frozenset[str] = frozenset()
"""Attributes the last connection checked lacks (`Client._nuid`)."""
_warned: set[str] = set()
"""Attributes already reported missing: each is logged once per process."""
_fast_publish = True
"""Whether `publish_output` builds its `HPUB` frame itself (all of `_FAST_PUBLISH` present)."""


def missing_attributes(client: NatsClient, js: JetStreamContext) -> list[str]:
    """The private attributes busway uses that `client` / `js` lack, as `Class._name`."""
    found = [f"Client.{name}" for name in CLIENT_ATTRIBUTES if not hasattr(client, name)]
    found += [f"JetStreamContext.{name}" for name in JETSTREAM_ATTRIBUTES if not hasattr(js, name)]
    return found


def check(client: NatsClient, js: JetStreamContext) -> None:
    """Find out once per connection which private paths work; warn once per missing one."""
    global _fast_publish, _missing
    _missing = frozenset(missing_attributes(client, js))
    for name in sorted(_missing - _warned):
        _warned.add(name)
        logger.warning(
            "nats-py %s has no %s: busway takes the public (slower or less precise) path "
            "for it; report this with the nats-py version",
            _VERSION,
            name,
        )
    _fast_publish = _missing.isdisjoint(_FAST_PUBLISH)


def available(name: str) -> bool:
    """Whether the private attribute `name` (`Client._server_info`) was found."""
    return name not in _missing


def set_fast_publish(enabled: bool) -> bool:
    """Turn `publish_output`'s private fast path on or off (tests, benches); the old value."""
    global _fast_publish
    old, _fast_publish = _fast_publish, enabled
    return old


# -- the connection ---------------------------------------------------------------------------


def server_info(client: NatsClient) -> dict[str, Any]:
    """The INFO the connected server announced ({} if nats-py does not keep it)."""
    info = getattr(client, "_server_info", None)
    return info if isinstance(info, dict) else {}


def server_name(client: NatsClient) -> str | None:
    """The `server_name` the server announced in its INFO (None if unknown)."""
    name = server_info(client).get("server_name")
    return name if isinstance(name, str) else None


class TlsNotOffered(nats.errors.Error):
    """The server's INFO does not ask for TLS, but busway is configured to use it."""

    def __str__(self) -> str:
        return (
            "the server does not offer TLS (its INFO has no tls_required), but [nats] asks for "
            "TLS: busway refused to send its credentials in clear"
        )


def require_tls(client: NatsClient) -> bool:
    """Make `client` refuse a server that does not ask for TLS, before it sends CONNECT.

    nats-py upgrades to TLS only when the server's first INFO says `tls_required`; anything
    between busway and the server could drop the flag and read the CONNECT. False if the hook
    is missing (the caller then checks `server_info` after connecting).
    """
    original = getattr(client, "_process_info", None)
    if original is None:
        return False

    async def checked(info: dict[str, Any], initial_connection: bool = False) -> None:
        if initial_connection and not info.get("tls_required"):
            raise TlsNotOffered()
        await original(info, initial_connection=initial_connection)

    client._process_info = checked  # type: ignore[method-assign]
    return True


async def close_transport(client: NatsClient) -> None:
    """Close the socket a cancelled connection attempt may have left open (see `_abandon`)."""
    transport = getattr(client, "_transport", None)
    if transport is not None:
        transport.close()
        await transport.wait_closed()


# -- async publish: refusals and lost PubAcks -------------------------------------------------


def resolve_refusals_at_once(client: NatsClient, js: JetStreamContext) -> None:
    """Make a refused async publish fail its PubAck future at once, with JetStream's words.

    nats-py's async-publish reply handler calls `APIError.from_error`, which *raises* the
    error instead of returning it, so the future of a refused message (stream full, message
    too large...) is never resolved: the error goes to the connection's error callback and the
    publisher waits out its whole `publish_timeout`. Here the raised error resolves the future.
    """
    handle: Callable[[Msg], Awaitable[None]] | None = getattr(js, "_handle_async_reply", None)
    inbox_prefix = getattr(client, "_inbox_prefix", None)
    if handle is None or inbox_prefix is None or not hasattr(js, "_publish_async_futures"):
        return  # refusals then surface as PubAck timeouts
    prefix_length = len(inbox_prefix) + 24  # as nats-py slices the reply token

    async def handle_async_reply(message: Msg) -> None:
        try:
            await handle(message)
        except nats.js.errors.APIError as exc:
            # Looked up now: nats-py replaces the dict when it sets up its reply inbox.
            future = js._publish_async_futures.get(message.subject[prefix_length:])
            if future is not None and not future.done():
                future.set_exception(exc)

    js._handle_async_reply = handle_async_reply  # type: ignore[method-assign,assignment]


def on_pub_ack(js: JetStreamContext, callback: Callable[[], None]) -> bool:
    """Call `callback` on every PubAck (or refusal) JetStream sends `js`; False if nats-py
    offers no place to hook it (then nothing is called)."""
    handle: Callable[[Msg], Awaitable[None]] | None = getattr(js, "_handle_async_reply", None)
    if handle is None:
        return False

    async def handle_async_reply(message: Msg) -> None:
        callback()
        await handle(message)

    js._handle_async_reply = handle_async_reply  # type: ignore[method-assign,assignment]
    return True


def waiting_pub_acks(js: JetStreamContext) -> int:
    """How many async publishes wait for their PubAck (0 if nats-py does not say)."""
    # Looked up each time: nats-py replaces the dict when it sets up its reply inbox.
    futures: dict[str, asyncio.Future[PubAck]] | None = getattr(js, "_publish_async_futures", None)
    return sum(1 for future in list((futures or {}).values()) if not future.done())


def fail_pending_publishes(js: JetStreamContext, error: BaseException) -> int:
    """Fail every publish still waiting for its PubAck with `error`; how many there were
    (0 without the attribute: they then time out one by one)."""
    futures: dict[str, asyncio.Future[PubAck]] | None = getattr(js, "_publish_async_futures", None)
    pending = [f for f in list((futures or {}).values()) if not f.done()]
    for future in pending:
        future.set_exception(error)
    return len(pending)


def publish_window_full(js: JetStreamContext) -> bool:
    """True if a publish would wait for room in the publish window (True if unknown)."""
    semaphore = getattr(js, "_publish_async_pending_semaphore", None)
    return semaphore is None or bool(semaphore.locked())


# -- the route output fast path ---------------------------------------------------------------

_HEADER_START = b"NATS/1.0\r\nNats-Msg-Id: "


async def publish_output(
    js: JetStreamContext,
    subject: str,
    payload: bytes,
    message_id: str,
    headers: dict[str, str] | None,
) -> asyncio.Future[PubAck]:
    """`js.publish_async(subject, payload, headers=headers)` with `Nats-Msg-Id: message_id`
    added to `headers` (a dict the caller built for this output; None if it has no other);
    never raises: a publish that could not be sent is a future failed with a PublishError.

    Every route output carries a `Nats-Msg-Id`, and usually no other header. nats-py encodes
    headers on each publish (a regex check of the key, strip and newline translation of the
    value, a bytearray built piece by piece, an f-string for the `HPUB` line): about 2 µs of a
    ~40 µs hop, measured. Here that `HPUB` frame is built with one bytes-format, and the future
    is registered exactly as nats-py's `publish_async` does (same dict, same semaphore, same
    completion event), so its reply handler, `publish_async_completed` and `fail_unconfirmed`
    see these publishes like any other. Anything unusual (other headers, not connected, no
    reply inbox yet, a large payload, an attribute missing) takes nats-py's own path.
    """
    try:
        if headers:
            headers["Nats-Msg-Id"] = message_id
            return await js.publish_async(subject, payload, headers=headers)
        if not _fast_publish:
            return await js.publish_async(subject, payload, headers={"Nats-Msg-Id": message_id})
        nc = js._nc
        prefix = js._async_reply_prefix
        if prefix is None or not nc.is_connected or len(payload) > nc._max_payload:
            return await js.publish_async(subject, payload, headers={"Nats-Msg-Id": message_id})
        return await _publish_frame(js, nc, prefix, subject, payload, message_id)
    except TRANSPORT_ERRORS as exc:
        failed: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
        failed.set_exception(publish_error(exc, subject))
        return failed


async def _publish_frame(
    js: JetStreamContext,
    nc: NatsClient,
    prefix: bytes | bytearray,
    subject: str,
    payload: bytes,
    message_id: str,
) -> asyncio.Future[PubAck]:
    semaphore = js._publish_async_pending_semaphore
    await semaphore.acquire()
    token = nc._nuid.next()
    token.extend(token_hex(2).encode())
    key = token.decode()
    futures = js._publish_async_futures
    completed = js._publish_async_completed_event

    def done(_: asyncio.Future[PubAck]) -> None:
        futures.pop(key, None)
        if not futures:
            completed.set()
        semaphore.release()

    future: asyncio.Future[PubAck] = asyncio.get_running_loop().create_future()
    future.add_done_callback(done)
    futures[key] = future
    if completed.is_set():
        completed.clear()
    header = _HEADER_START + message_id.encode() + b"\r\n\r\n"
    command = b"HPUB %s %s%s %d %d\r\n%s%s\r\n" % (
        subject.encode(),
        prefix,
        token,
        len(header),
        len(header) + len(payload),
        header,
        payload,
    )
    nc.stats["out_msgs"] += 1
    nc.stats["out_bytes"] += len(payload)
    await nc._send_command(command)
    if nc._flush_queue is not None and nc._flush_queue.empty():
        await nc._flush_pending()
    return future


# -- JetStream API requests nats-py does not offer as we need them ----------------------------


async def delete_without_erase(js: JetStreamContext, stream: str, seq: int) -> None:
    """Delete message `seq` of `stream` without overwriting its bytes on disk (`no_erase`).

    nats-py's `delete_msg` always asks for a secure erase, which made deleting about three
    times slower here (`sync_interval: always`) and is not what a dead-letter purge promises.
    Raises nats-py's errors (the caller maps them).
    """
    nc: Any = getattr(js, "_nc", None)
    prefix = getattr(js, "_prefix", None)
    timeout = getattr(js, "_timeout", None)
    if nc is None or prefix is None or timeout is None:
        await js.delete_msg(stream, seq)
        return
    request = orjson.dumps({"seq": seq, "no_erase": True})
    answer = await nc.request(f"{prefix}.STREAM.MSG.DELETE.{stream}", request, timeout=timeout)
    response = orjson.loads(answer.data)
    if "error" in response:
        nats.js.errors.APIError.from_error(response["error"])  # raises the matching error
