"""RabbitMQ throughput: busway's amqp sink and source vs hand-written aio-pika <-> nats-py loops.

Into RabbitMQ (`sink`): N JSON messages preloaded in a stream are published to a durable queue
  * busway: an `amqp` sink (batch_size 256, publisher confirms, mandatory, persistent);
  * raw:    a pull subscription fetching 256 at a time, each batch published with aio-pika
            (confirms, mandatory, persistent, message_id), awaited together, then each NATS
            message acked: the same at-least-once contract.
Out of RabbitMQ (`source`): N persistent messages in a durable queue become stream messages
  * busway: an `amqp` source (prefetch 256, Nats-Msg-Id from message_id);
  * raw:    an aio-pika consumer (prefetch 256) publishing each body with `publish_async`
            and acking it to RabbitMQ after its own PubAck.

Each figure is messages per second, median of `--rounds`; the ratio is busway / raw. The
RabbitMQ node is the tests' own (`tests/amqp/servers.py`); nats-server runs with
`sync_interval: always` (`--sync always`, busway's embedded default) or its default.

    python benches/bench_amqp.py                   # 20k messages, sync always, 3 rounds
    python benches/bench_amqp.py --sync default --count 50000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import anyio
import nats
import nats.js.errors
import orjson

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from busway import Bus, default_registry  # noqa: E402
from busway._config.model import decode_config  # noqa: E402
from tests.amqp.servers import RabbitServer  # noqa: E402
from tests.support import NatsServer  # noqa: E402

BATCH = 256


def body(i: int) -> bytes:
    return orjson.dumps({"id": i, "customer": f"customer {i % 977}", "total": i % 1000})


def config(nats_url: str, text: str, *, top: str = "") -> Any:
    registry = default_registry()
    full = f"""{top}
[nats]
servers = ["{nats_url}"]
[http]
listen = "127.0.0.1:0"
[[streams]]
name = "BENCH"
subjects = ["bench.>"]
duplicate_window = "10m"
{text}
"""
    return decode_config(full, source_types=registry.source_config, sink_types=registry.sink_config)


async def poll_until(check: Callable[[], Awaitable[bool]]) -> None:
    while True:
        if await check():
            return
        await anyio.sleep(0.02)


async def reset_stream(nc: nats.NATS, count: int) -> None:
    js = nc.jetstream(publish_async_max_pending=4096)
    with contextlib.suppress(nats.js.errors.NotFoundError):
        await js.delete_stream("BENCH")
    await js.add_stream(name="BENCH", subjects=["bench.>"], duplicate_window=600)
    for i in range(count):
        await js.publish_async("bench.orders", body(i), headers={"Nats-Msg-Id": f"m{i}"})
    await js.publish_async_completed()


async def fresh_queue(channel: aio_pika.abc.AbstractChannel) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    await channel.declare_queue(name, durable=True)
    return name


async def depth(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return int(declared.declaration_result.message_count or 0)


async def sink_busway(nc: nats.NATS, nats_url: str, rabbit: RabbitServer, count: int) -> float:
    await reset_stream(nc, count)
    connection = await aio_pika.connect(rabbit.url)
    channel = await connection.channel()
    queue = await fresh_queue(channel)
    text = f"""
[[sinks]]
name = "bench-sink"
type = "amqp"
from = "bench.orders"
url = "{rabbit.url}"
routing_key = "{queue}"
batch_size = {BATCH}
max_in_flight = {4 * BATCH}
"""
    async with Bus(config(nats_url, text)):
        started = time.perf_counter()

        async def delivered() -> bool:
            return await depth(channel, queue) >= count

        await poll_until(delivered)
        elapsed = time.perf_counter() - started
    await channel.queue_delete(queue)
    await connection.close()
    return count / elapsed


async def sink_raw(nc: nats.NATS, rabbit: RabbitServer, count: int) -> float:
    await reset_stream(nc, count)
    connection = await aio_pika.connect(rabbit.url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await fresh_queue(channel)
    js = nc.jetstream()
    subscription = await js.pull_subscribe("bench.orders", durable=f"raw{uuid.uuid4().hex[:6]}")
    started = time.perf_counter()
    done = 0
    while done < count:
        messages = await subscription.fetch(BATCH, timeout=5)
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        m.data,
                        message_id=m.headers.get("Nats-Msg-Id") if m.headers else None,
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=queue,
                    mandatory=True,
                )
                for m in messages
            )
        )
        for m in messages:
            await m.ack()
        done += len(messages)
    elapsed = time.perf_counter() - started
    await subscription.unsubscribe()
    await channel.queue_delete(queue)
    await connection.close()
    return count / elapsed


async def fill_queue(rabbit: RabbitServer, count: int) -> str:
    connection = await aio_pika.connect(rabbit.url)
    channel = await connection.channel(publisher_confirms=True)
    queue = await fresh_queue(channel)
    for start in range(0, count, 1000):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    aio_pika.Message(
                        body(i), message_id=f"m{i}", delivery_mode=aio_pika.DeliveryMode.PERSISTENT
                    ),
                    routing_key=queue,
                )
                for i in range(start, min(count, start + 1000))
            )
        )
    await connection.close()
    return queue


async def source_busway(nc: nats.NATS, nats_url: str, rabbit: RabbitServer, count: int) -> float:
    await reset_stream(nc, 0)
    queue = await fill_queue(rabbit, count)
    js = nc.jetstream()
    text = f"""
[[sources]]
name = "bench-source"
type = "amqp"
url = "{rabbit.url}"
queue = "{queue}"
subject = "bench.in"
prefetch = {BATCH}
"""
    started = time.perf_counter()
    async with Bus(config(nats_url, text)):

        async def stored() -> bool:
            return (await js.stream_info("BENCH")).state.messages >= count

        await poll_until(stored)
        elapsed = time.perf_counter() - started
    return count / elapsed


async def source_raw(nc: nats.NATS, rabbit: RabbitServer, count: int) -> float:
    await reset_stream(nc, 0)
    queue_name = await fill_queue(rabbit, count)
    js = nc.jetstream(publish_async_max_pending=4 * BATCH)
    connection = await aio_pika.connect(rabbit.url)
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=BATCH)
    queue = await channel.get_queue(queue_name)
    finished = asyncio.Event()
    stored = 0

    async def handle(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        nonlocal stored
        future = await js.publish_async(
            "bench.in", message.body, headers={"Nats-Msg-Id": f"raw:{message.message_id}"}
        )
        await future
        await message.ack()
        stored += 1
        if stored >= count:
            finished.set()

    started = time.perf_counter()
    await queue.consume(handle)
    await finished.wait()
    elapsed = time.perf_counter() - started
    await connection.close()
    return count / elapsed


async def run(args: argparse.Namespace) -> None:
    store = Path(tempfile.mkdtemp(prefix="busway-bench-amqp-"))
    server = NatsServer(store, sync_always=args.sync == "always")
    rabbit = RabbitServer()
    try:
        nc = await nats.connect(server.url)
        results: dict[str, list[float]] = {k: [] for k in ("sink", "sink_raw", "src", "src_raw")}
        for _ in range(args.rounds):
            results["sink_raw"].append(await sink_raw(nc, rabbit, args.count))
            results["sink"].append(await sink_busway(nc, server.url, rabbit, args.count))
            results["src_raw"].append(await source_raw(nc, rabbit, args.count))
            results["src"].append(await source_busway(nc, server.url, rabbit, args.count))
        await nc.close()
    finally:
        rabbit.close()
        server.stop()
    median = {key: statistics.median(values) for key, values in results.items()}
    print(
        f"RabbitMQ 3.10 (durable queue, persistent messages), nats-server sync={args.sync}, "
        f"{args.count} messages, batch/prefetch {BATCH}, median of {args.rounds}"
    )
    print(
        f"into RabbitMQ: busway sink {median['sink']:,.0f} msg/s, raw loop "
        f"{median['sink_raw']:,.0f} msg/s, ratio {median['sink'] / median['sink_raw']:.2f}"
    )
    print(
        f"out of RabbitMQ: busway source {median['src']:,.0f} msg/s, raw loop "
        f"{median['src_raw']:,.0f} msg/s, ratio {median['src'] / median['src_raw']:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync", choices=["always", "default"], default="always")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
