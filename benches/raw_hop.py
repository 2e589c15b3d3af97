"""The raw nats-py hop: the baseline busway's hop is measured against.

Adapted from the reference we measured peers with (shared/perf/bench_hop_raw.py): a durable
pull consumer fed by our own continuous pull requests on an inbox, each message decoded,
filtered and mapped by hand-written Python, published with `publish_async` (at most `window`
acks outstanding), and acked in order by a separate task once its output's PubAck arrived.
It carries no `Nats-Msg-Id`, no metrics and no dead-lettering: the minimum a correct
at-least-once hop does.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

import nats
import orjson
from nats.js.api import AckPolicy, ConsumerConfig

DURABLE = "raw-hop"


async def run_raw_hop(
    url: str,
    count: int,
    window: int,
    predicate: Callable[[Any], bool],
    mapping: Callable[[Any], Any],
    *,
    batch: int = 256,
    max_ack_pending: int = 4000,
) -> float:
    """Seconds to drain `count` messages from IN to OUT (consumer creation included)."""
    client = await nats.connect(url)
    js = client.jetstream(publish_async_max_pending=window)
    started = time.perf_counter()
    await js.add_consumer(
        "IN",
        ConsumerConfig(
            durable_name=DURABLE,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=30,
            max_ack_pending=max_ack_pending,
            filter_subject="in.>",
        ),
    )
    inflight: collections.deque[tuple[asyncio.Future[Any] | None, Any]] = collections.deque()
    wake = asyncio.Event()
    finished = asyncio.Event()
    done = 0

    async def acker() -> None:
        nonlocal done
        while True:
            if not inflight:
                wake.clear()
                await wake.wait()
                continue
            future, message = inflight.popleft()
            if future is not None:
                try:
                    await future
                except Exception:
                    await message.nak()
                    continue
            await message.ack()
            done += 1
            if done == count:
                finished.set()

    inbox = client.new_inbox()
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.IN.{DURABLE}"
    request = orjson.dumps({"batch": batch, "expires": 30_000_000_000})
    outstanding = 0

    async def pull() -> None:
        nonlocal outstanding
        outstanding += batch
        await client.publish(next_subject, request, reply=inbox)

    async def on_message(message: Any) -> None:
        nonlocal outstanding
        if not message.data and message.headers and "Status" in message.headers:
            if message.headers["Status"] in ("408", "409"):
                left = message.headers.get("Nats-Pending-Messages")
                outstanding = max(0, outstanding - int(left)) if left else 0
        else:
            outstanding -= 1
            document = orjson.loads(message.data)
            future = None
            if predicate(document):
                future = await js.publish_async("out.orders", orjson.dumps(mapping(document)))
            inflight.append((future, message))
            wake.set()
        if outstanding <= batch // 2:
            await pull()

    acker_task = asyncio.ensure_future(acker())
    await client.subscribe(inbox, cb=on_message)
    await pull()
    await finished.wait()
    await client.flush()
    elapsed = time.perf_counter() - started
    acker_task.cancel()
    await client.close()
    return elapsed
