"""`Idempotency-Key` at the HTTP edge, after draft-ietf-httpapi-idempotency-key-header.

A key is a client's name for one request. Three rules:

* **Scoped per client.** The message id (`Nats-Msg-Id`) is `<source>:<principal>:<key>`, the
  principal being `anon` without `auth`, else `key.<hash>` or `jwt.<hash>` (`auth.Identity`),
  and the key percent-encoded (`:` and `%` too). Principals are hex and keys hold no `:`, so
  no key and no credential can spell another client's id: two clients sending the same key
  store two messages.
* **One request per key.** The first request's fingerprint (SHA-256 over method, path,
  `Content-Type`, the `ce-*` headers and the body, byte for byte) is recorded in the source's
  `DedupStore` before anything is published; the same key with another fingerprint is refused
  with 422, by any daemon sharing the NATS (the record is created atomically).
* **Answers are kept** (request-reply): the route's answer is recorded with the key, so a
  retry gets it again (`Idempotent-Replayed: true`), or 409 + `Retry-After` while the first
  request is still being processed.

Records expire with the stream's `duplicate_window`, when JetStream forgets the message id too:
after that, a key is new again.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Literal
from urllib.parse import quote

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from busway import DedupStore, RetryableError
from busway.adapters.http.auth import Identity
from busway.adapters.http.problems import Problem

__all__ = ["ANONYMOUS", "Ledger", "Record", "State", "fingerprint", "key_id", "replay", "scope"]

ANONYMOUS = "anon"
"""The principal of every caller of a source without `auth`: they share one key space."""

State = Literal["accepted", "processing", "answered"]


class Record(msgspec.Struct, frozen=True, array_like=True):
    """What is kept with a key: the request's fingerprint and, once answered, the answer."""

    fingerprint: str
    state: State
    status: int = 0
    content_type: str = ""
    body: bytes = b""


_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder(Record).decode


def scope(source: str, identity: Identity | None) -> str:
    """`<source>:<principal>`: the prefix of every message id a client's requests make."""
    return f"{source}:{identity.principal if identity is not None else ANONYMOUS}"


def key_id(prefix: str, key: str) -> str:
    """The message id of `key` under `prefix`; the key percent-encoded, `:` and `%` included."""
    return f"{prefix}:{quote(key, safe='')}"


def fingerprint(request: Request, body: bytes) -> str:
    """SHA-256 over what makes the stored message: method, path, media type, CloudEvents
    attributes and body. Length-prefixed parts, so no two different requests hash alike."""
    headers = request.headers
    events = sorted((k, v) for k, v in headers.items() if k.startswith("ce-"))
    parts = [
        request.method,
        request.url.path,
        headers.get("content-type", ""),
        msgspec.json.encode(events).decode(),
    ]
    digest = hashlib.sha256()
    for part in (*(p.encode() for p in parts), body):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


class Ledger:
    """One source's idempotency records, in its `DedupStore`."""

    def __init__(self, store: DedupStore, logger: logging.Logger, *, retry_after: int) -> None:
        self.store = store
        self.logger = logger
        self.retry_after = retry_after

    async def claim(self, message_id: str, key: str, record: Record) -> Record | None:
        """Record `record` for `message_id` unless one is there: None if this request owns the
        key now, else the record of the same request made before. Problem 422 if the key was
        used for a different request, 503 if the records cannot be reached."""
        try:
            present = await self.store.create(_store_key(message_id), _encode(record))
        except RetryableError as exc:
            self.logger.warning("503: idempotency records unreachable: %s", exc)
            raise Problem(
                503,
                "unavailable",
                "Service Unavailable",
                "the request was not stored; retry later with the same Idempotency-Key",
                headers={"Retry-After": str(self.retry_after)},
            ) from None
        if present is None:
            return None
        try:
            before = _decode(present)
        except msgspec.DecodeError:
            self.logger.warning("unreadable idempotency record for %s: overwritten", message_id)
            await self.put(message_id, record)
            return None
        if before.fingerprint != record.fingerprint:
            raise Problem(
                422,
                "idempotency-key-reused",
                "Unprocessable Content",
                f"Idempotency-Key {key!r} was already used for a different request (method, "
                "path, Content-Type, ce-* headers or body differ); use a new key for a new "
                f"request (a key is remembered for {self.store.ttl:g}s)",
                field="header.Idempotency-Key",
            )
        return before

    async def put(self, message_id: str, record: Record) -> None:
        """Replace the record (e.g. with the answer); a failure is logged: retries then get
        409 until the record expires."""
        try:
            await self.store.put(_store_key(message_id), _encode(record))
        except RetryableError as exc:
            self.logger.warning("cannot record the outcome of %s: %s", message_id, exc)

    async def release(self, message_id: str) -> None:
        """Forget the key: nothing was stored, so a retry (even a corrected one) starts afresh."""
        try:
            await self.store.delete(_store_key(message_id))
        except RetryableError as exc:
            self.logger.warning("cannot release the key of %s: %s", message_id, exc)

    def in_progress(self) -> Problem:
        """409: the first request with this key is still waiting for its answer."""
        return Problem(
            409,
            "request-in-progress",
            "Conflict",
            "a request with this Idempotency-Key is still being processed; retry after the "
            "Retry-After delay to get its answer",
            field="header.Idempotency-Key",
            headers={"Retry-After": str(self.retry_after)},
        )


def replay(record: Record) -> Response:
    """The recorded answer, again."""
    return Response(
        record.body,
        status_code=record.status,
        media_type=record.content_type,
        headers={"Idempotent-Replayed": "true"},
    )


def _store_key(message_id: str) -> str:
    """A KV key for any message id (KV keys take few characters)."""
    return hashlib.sha256(message_id.encode()).hexdigest()
