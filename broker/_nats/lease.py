"""A lease in a JetStream key-value bucket: one holder per name across daemons, with fencing.

Some sources must run in one daemon at a time however many share a config: an incremental
database source whose watermark two readers would race. The lease is one key of the state
bucket (`=lease.<source>[.<name>]`; `=` cannot start a component name, so it never meets a
source's own state keys) whose value names the holder and its `ttl`.

* **Acquire**: `create` (the key must be absent or deleted): compare-and-set on the revision,
  so of two daemons racing, one wins. The winning revision is the **fencing token**: it only
  grows, so a later holder always has a greater token than any earlier one, and a store
  that remembers the token it was last written with can refuse a stale holder's write.
* **Renew** every `ttl / 4` with `update(last=<revision>)`. A renewal that fails its CAS
  means another daemon took the lease: the holder stops at once. A renewal that gets no
  answer is retried until the lease's validity runs out (`0.75 * ttl` after the last
  successful renewal was *sent*), then the holder stops too.
* **Expire**: a contender that sees the same revision for a whole `ttl` (the holder's `ttl`
  as stored, or its own if longer), timed on its *own* monotonic clock, takes the lease over
  with `update(last=<that revision>)`. No clocks are compared between hosts: the contender
  first saw the revision after the holder sent it, so the holder, who gives up `0.75 * ttl`
  after sending, has stopped a quarter `ttl` before the contender can start.
* **Release**: a holder that stops on purpose deletes the key (CAS on its revision), so a
  standby takes over at its next check instead of after a `ttl`.

A holder killed with SIGKILL is replaced within `ttl + 2 * check` (a contender's first look
may come one check after the last renewal, its takeover one check after the `ttl`), with
`check = ttl / 4`: `1.5 * ttl`. Why not per-key TTLs (nats-server 2.11's `Nats-TTL`): they
need the bucket created with `allow_msg_ttl` (busway's state bucket predates it) and nats-py
offers them on `create` only, not on the `update` a renewal is; the observed-revision rule
works on every server and needs no synchronised clocks.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator

import anyio
import nats.errors
import nats.js.errors
import orjson
from nats.js.kv import KeyValue

from busway._errors import RetryableError
from busway._nats.kv import Bucket

__all__ = ["KeyValueLease", "LeaseKeeper", "lease_key", "new_holder_id"]

logger = logging.getLogger("busway.lease")

_VALID = 0.75
"""The share of `ttl` a holder counts as valid after sending a renewal that succeeded."""
_CHECK = 0.25
"""The share of `ttl` between two renewals, and between two looks of a contender."""
_WRONG_LAST = (10071, 10164)
"""JetStream's "wrong last sequence" error codes: a compare-and-set found another revision."""


def lease_key(source: str, name: str = "") -> str:
    """The state-bucket key of `source`'s lease `name`."""
    return f"=lease.{source}.{name}" if name else f"=lease.{source}"


def new_holder_id() -> str:
    """A name for one holder: host, process and a random part (a restart is a new holder)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class KeyValueLease:
    """A held lease: its fencing token, and whether it was lost (the body was then cancelled)."""

    def __init__(self, key: str, holder: str, token: int) -> None:
        self.key = key
        self.holder = holder
        self.token = token
        """The revision that acquired the lease: greater than any earlier holder's."""
        self.revision = token
        """The revision of the last renewal; the next one must find it unchanged."""
        self.renewals = 0
        self.lost = False
        self.reason = ""


class LeaseKeeper:
    """Acquires, renews and releases one lease; `hold()` is what a source enters."""

    def __init__(
        self,
        bucket: KeyValue | Bucket,
        key: str,
        *,
        ttl: float,
        holder: str,
        log: logging.Logger | None = None,
        timeout: float = 2.0,
    ) -> None:
        if ttl <= 0:
            raise ValueError("a lease ttl must be positive")
        # Leases need revision-level operations (update with last, delete with last) that
        # `Bucket` does not offer the engine: use the bucket's nats-py handle, inside _nats.
        self._bucket = bucket.kv if isinstance(bucket, Bucket) else bucket
        self.key = key
        self.ttl = ttl
        self.holder = holder
        self._logger = log or logger
        self._timeout = min(timeout, ttl * _CHECK)
        self._value = orjson.dumps({"holder": holder, "ttl": ttl})

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[KeyValueLease]:
        """Wait until this daemon holds the lease, then run the body while it does.

        The body is cancelled as soon as the lease is lost; the block then ends normally with
        `lease.lost` true, and the caller goes back to waiting. Leaving the block otherwise
        (done, failed, cancelled) releases the lease for the next holder.
        """
        lease = await self._acquire()
        error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                with anyio.CancelScope() as body:
                    tg.start_soon(self._keep, lease, body)
                    try:
                        yield lease
                    except Exception as exc:  # raised below, outside the task group
                        error = exc
                    finally:
                        tg.cancel_scope.cancel()
        finally:
            if not lease.lost:
                with anyio.move_on_after(self._timeout, shield=True):
                    await self._release(lease)
        if error is not None:
            raise error

    async def _acquire(self) -> KeyValueLease:
        seen: tuple[int, float] | None = None  # (revision, when this daemon first saw it)
        waiting_logged = False
        while True:
            try:
                lease = await self._try_acquire(seen)
            except RetryableError as exc:
                self._logger.warning("lease %s: %s; retrying", self.key, exc)
                lease = None
            if isinstance(lease, KeyValueLease):
                self._logger.info(
                    "lease %s acquired (fencing token %d, ttl %.1fs)",
                    self.key,
                    lease.token,
                    self.ttl,
                )
                return lease
            if isinstance(lease, tuple):
                if seen is None or seen[0] != lease[0]:
                    seen = lease
                if not waiting_logged:
                    self._logger.info("standby: lease %s is held by another daemon", self.key)
                    waiting_logged = True
            await anyio.sleep(self.ttl * _CHECK)

    async def _try_acquire(
        self, seen: tuple[int, float] | None
    ) -> KeyValueLease | tuple[int, float] | None:
        """The lease if taken now; else (revision seen, when first seen) to wait on."""
        try:
            with anyio.fail_after(self._timeout):
                entry = await self._bucket.get(self.key)
        except nats.js.errors.KeyNotFoundError:  # absent, deleted or purged: free
            return await self._write(None)
        except (nats.errors.Error, TimeoutError) as exc:
            raise RetryableError(f"cannot read: {exc!r}") from exc
        now = anyio.current_time()
        revision = entry.revision or 0
        if seen is None or seen[0] != revision:
            return (revision, now)
        if now - seen[1] < self._ttl_of(entry.value):
            return seen
        self._logger.warning(
            "lease %s: its holder (%s) has not renewed it for %.1fs: taking over",
            self.key,
            self._holder_of(entry.value),
            now - seen[1],
        )
        return await self._write(revision)

    async def _write(self, last: int | None) -> KeyValueLease | None:
        """Create (`last` None) or take over (CAS on `last`); None if another daemon won."""
        try:
            with anyio.fail_after(self._timeout):
                if last is None:
                    revision = await self._bucket.create(self.key, self._value)
                else:
                    revision = await self._bucket.update(self.key, self._value, last=last)
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except (nats.errors.Error, TimeoutError) as exc:
            raise RetryableError(f"cannot write: {exc!r}") from exc
        return KeyValueLease(self.key, self.holder, revision)

    async def _keep(self, lease: KeyValueLease, body: anyio.CancelScope) -> None:
        """Renew until cancelled; on a lost lease, cancel the body and return."""
        valid_until = anyio.current_time() + self.ttl * _VALID
        while True:
            await anyio.sleep(self.ttl * _CHECK)
            while True:
                sent = anyio.current_time()
                if sent >= valid_until:
                    self._lose(lease, body, "it could not be renewed in time")
                    return
                try:
                    with anyio.fail_after(min(self._timeout, valid_until - sent)):
                        revision = await self._bucket.update(
                            self.key, self._value, last=lease.revision
                        )
                except nats.js.errors.KeyWrongLastSequenceError:
                    self._lose(lease, body, "another daemon took it over")
                    return
                except (nats.errors.Error, TimeoutError) as exc:
                    self._logger.warning("lease %s: renewal failed, retrying: %r", self.key, exc)
                    await anyio.sleep(min(0.2, max(0.0, valid_until - anyio.current_time())))
                    continue
                lease.revision = revision
                lease.renewals += 1
                valid_until = sent + self.ttl * _VALID
                break

    def _lose(self, lease: KeyValueLease, body: anyio.CancelScope, reason: str) -> None:
        lease.lost = True
        lease.reason = reason
        self._logger.warning("lease %s lost (%s): stopping until it is won again", self.key, reason)
        body.cancel()

    async def _release(self, lease: KeyValueLease) -> None:
        try:
            try:
                await self._bucket.delete(self.key, last=lease.revision)
            except nats.js.errors.APIError as exc:
                # A renewal cancelled in flight may have been stored without this holder
                # learning its revision: if the key still names this holder, it is ours.
                if exc.err_code not in _WRONG_LAST or not await self._release_current():
                    raise
        except (nats.errors.Error, TimeoutError) as exc:  # it expires on its own
            self._logger.info(
                "lease %s not released (%r): it expires in %.1fs", self.key, exc, self.ttl
            )
        else:
            self._logger.info("lease %s released", self.key)

    async def _release_current(self) -> bool:
        """Delete the key at its current revision if it still names this holder."""
        entry = await self._bucket.get(self.key)
        if self._holder_of(entry.value) != self.holder:
            return False
        await self._bucket.delete(self.key, last=entry.revision)
        return True

    def _ttl_of(self, value: bytes | None) -> float:
        """The holder's ttl as it stored it, or ours if longer (or if the value is foreign)."""
        try:
            stored = float(orjson.loads(value or b"{}").get("ttl", 0))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            stored = 0.0
        return max(self.ttl, stored)

    @staticmethod
    def _holder_of(value: bytes | None) -> str:
        try:
            return str(orjson.loads(value or b"{}").get("holder", "?"))
        except (orjson.JSONDecodeError, AttributeError):
            return "?"
