"""The KV lease and the fenced watermark, against a real nats-server.

Two `LeaseKeeper`s on one key stand for two daemons: one holds, the other waits; a release
hands over at once, a holder that stopped renewing (it died) is replaced after its ttl and not
before, a holder whose lease was taken stops at once, and a stale holder's watermark write is
refused by its fencing token.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.kv import KeyValue

from busway import SourceContext
from busway._nats.jetstream import JetStreamPublisher, KeyValueState, state_bucket
from busway._nats.lease import KeyValueLease, LeaseKeeper, lease_key
from busway._observe.metrics import ComponentStats
from busway.adapters.sql._watermark import FencedOut, load_watermark, store_watermark
from tests.support import eventually

pytestmark = pytest.mark.anyio

TTL = 1.0


@pytest.fixture
async def bucket(nc: NatsClient) -> KeyValue:
    return await state_bucket(nc.jetstream(), "busway_state")


def keeper(bucket: KeyValue, key: str, holder: str) -> LeaseKeeper:
    return LeaseKeeper(bucket, key, ttl=TTL, holder=holder)


class Holding:
    """Runs `keeper.hold()` in a task until told to leave; records what happened."""

    def __init__(self, keeper: LeaseKeeper) -> None:
        self.keeper = keeper
        self.lease: KeyValueLease | None = None
        self.entered_at: float | None = None
        self.left = anyio.Event()
        self.leave = anyio.Event()
        self.cancelled = False

    async def run(self) -> None:
        async with self.keeper.hold() as lease:
            self.lease = lease
            self.entered_at = time.monotonic()
            try:
                await self.leave.wait()
            except BaseException:
                self.cancelled = True
                raise
        self.left.set()


async def test_one_holder_at_a_time_and_a_release_hands_over_at_once(
    bucket: KeyValue, unique: str
) -> None:
    key = lease_key(f"one{unique}")
    first, second = Holding(keeper(bucket, key, "a")), Holding(keeper(bucket, key, "b"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(first.run)

        async def first_holds() -> bool:
            return first.lease is not None

        await eventually(first_holds)
        tg.start_soon(second.run)

        async def renewed_for_two_ttls() -> bool:  # the standby had time to take it: it did not
            return first.lease is not None and first.lease.renewals >= 8

        await eventually(renewed_for_two_ttls)
        assert second.lease is None
        first.leave.set()
        released_at = time.monotonic()

        async def second_holds() -> bool:
            return second.lease is not None

        await eventually(second_holds)
        second.leave.set()
    assert first.lease is not None and second.lease is not None
    assert not first.lease.lost and not first.cancelled
    assert second.lease.token > first.lease.token
    assert second.entered_at is not None and second.entered_at - released_at < TTL


async def test_a_dead_holder_is_replaced_after_its_ttl_and_not_before(
    bucket: KeyValue, unique: str
) -> None:
    key = lease_key(f"dead{unique}")
    # A daemon took the lease and died: nobody renews it.
    dead = await bucket.create(key, orjson.dumps({"holder": "dead:1:x", "ttl": TTL}))
    died_at = time.monotonic()
    standby = Holding(keeper(bucket, key, "standby"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(standby.run)

        async def taken_over() -> bool:
            return standby.lease is not None

        await eventually(taken_over, timeout=1.5 * TTL + 10)
        standby.leave.set()
    assert standby.entered_at is not None and standby.entered_at - died_at >= TTL
    assert standby.lease is not None and standby.lease.token > dead


async def test_a_holder_whose_lease_was_taken_stops_at_once(bucket: KeyValue, unique: str) -> None:
    key = lease_key(f"taken{unique}")
    holder = Holding(keeper(bucket, key, "a"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(holder.run)

        async def holds() -> bool:
            return holder.lease is not None

        await eventually(holds)
        # Another daemon wrote the key (as a takeover would): the next renewal's CAS fails.
        await bucket.put(key, orjson.dumps({"holder": "other:2:y", "ttl": TTL}))
        with anyio.fail_after(TTL + 10):
            await holder.left.wait()
    assert holder.lease is not None and holder.lease.lost and holder.cancelled
    assert "took it over" in holder.lease.reason
    # The lost holder did not release (delete) the other daemon's lease.
    entry = await bucket.get(key)
    assert orjson.loads(entry.value or b"{}")["holder"] == "other:2:y"


def context_for(bucket: KeyValue, nc: NatsClient, name: str) -> SourceContext:
    return SourceContext(
        name=name,
        publisher=JetStreamPublisher(nc.jetstream(), timeout=5),
        state=KeyValueState(bucket, f"{name}."),
        stats=ComponentStats(name, "source"),
        logger=logging.getLogger("test"),
        dead_letter_subject="deadletter.test",
    )


async def test_a_stale_holder_cannot_move_the_watermark(
    bucket: KeyValue, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    context = context_for(bucket, nc, f"wm{unique}")
    log = logging.getLogger("test")
    assert await store_watermark(context, [10], fence=5, logger=log) == [10]
    with pytest.raises(FencedOut, match="newer lease holder"):
        await store_watermark(context, [50], fence=3, logger=log)
    # The holder itself never goes back either: the higher stored watermark is kept.
    assert await store_watermark(context, [7], fence=5, logger=log) == [10]
    assert await store_watermark(context, [20], fence=8, logger=log) == [20]
    assert await load_watermark(context) == [20]
    stored: Any = orjson.loads((await bucket.get(f"wm{unique}.watermark")).value or b"")
    assert stored == {"fence": 8, "watermark": [["int", "20"]]}
    assert context.stats.errors == {"fenced_out": 1, "watermark_behind": 1}


async def test_a_watermark_stored_before_fencing_is_read_and_overwritten(
    bucket: KeyValue, nc: NatsClient, unique: str
) -> None:
    context = context_for(bucket, nc, f"old{unique}")
    await bucket.put(f"old{unique}.watermark", b'[["int","12"]]')
    assert await load_watermark(context) == [12]
    log = logging.getLogger("test")
    assert await store_watermark(context, [13], fence=1, logger=log) == [13]
