"""Throughput of the `mqtt` source and sink vs a hand-written aiomqtt <-> nats-py loop, same run.

Both sides do the same work with the same guarantees, against the same Mosquitto (a throwaway
broker from tests/mqtt/broker.py) and the same nats-server:

* source: N QoS 1 messages queued at the broker for a persistent session are published into a
  JetStream stream (with `Nats-Msg-Id`), each PUBACKed to the broker only after its PubAck.
  busway pipelines up to `max_in_flight`; the hand-written loop is the obvious one (publish,
  await the PubAck, PUBACK, next).
* sink: N messages preloaded in a stream are published to the broker with QoS 1, each acked in
  JetStream only after its PUBACK. busway batches (`batch_size`); the hand-written loop fetches
  batches of the same size, publishes them concurrently, then acks them.

Time runs from connect to the last message done, for both. Rounds alternate the two so drift
on a noisy machine hits both; medians are reported.

    python benches/bench_mqtt.py                    # 5000 msgs, 3 rounds, sync always
    python benches/bench_mqtt.py --count 20000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import anyio
import nats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from busway import Bus, default_registry  # noqa: E402
from busway._config.model import decode_config  # noqa: E402
from tests.mqtt.broker import MosquittoBroker  # noqa: E402
from tests.support import NatsServer  # noqa: E402

PAYLOAD = b'{"device": "d-17", "temp": 21.5, "seq": %d}'


async def _queue_for(broker: MosquittoBroker, client_id: str, count: int) -> None:
    """Create `client_id`'s persistent session (QoS 1 on bench/#) and queue `count` messages."""
    async with aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=client_id, clean_session=False
    ) as session:
        await session.subscribe("bench/#", qos=1)
    async with aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=1000) as device:
        await asyncio.gather(
            *(device.publish("bench/in", PAYLOAD % i, qos=1) for i in range(count))
        )


async def _stream(url: str, name: str, subject: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[subject])
    await nc.close()


async def _stored(url: str, name: str) -> int:
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info(name)
    await nc.close()
    return int(info.state.messages)


def _bus(text: str) -> Bus:
    registry = default_registry()
    config = decode_config(
        text,
        file="bench.toml",
        base_dir=".",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    return Bus(config, registry=registry, serve_http=False)


async def busway_source(url: str, broker: MosquittoBroker, count: int, tag: str) -> float:
    stream = f"SRC_BUSWAY_{tag}"
    await _stream(url, stream, f"src.busway.{tag}")
    await _queue_for(broker, f"bench-busway-{tag}", count)
    bus = _bus(
        f'[nats]\nservers = ["{url}"]\n[[streams]]\nname = "{stream}"\n'
        f'subjects = ["src.busway.{tag}"]\ncreate = false\n'
        f'[[sources]]\nname = "b{tag}"\ntype = "mqtt"\nsubject = "src.busway.{tag}"\n'
        f'topics = ["bench/#"]\nmax_in_flight = 500\nlease_ttl = "1s"\n'
        f'connection = {{ url = "{broker.url}", client_id = "bench-busway-{tag}" }}\n'
    )
    start = time.perf_counter()
    async with bus:
        while await _stored(url, stream) < count:  # noqa: ASYNC110 - a bench polls
            await anyio.sleep(0.01)
        return time.perf_counter() - start


async def raw_source(url: str, broker: MosquittoBroker, count: int, tag: str) -> float:
    stream = f"SRC_RAW_{tag}"
    await _stream(url, stream, f"src.raw.{tag}")
    await _queue_for(broker, f"bench-raw-{tag}", count)
    start = time.perf_counter()
    nc = await nats.connect(url)
    js = nc.jetstream()
    client = aiomqtt.Client(
        "127.0.0.1", broker.port, identifier=f"bench-raw-{tag}", clean_session=False
    )
    client._client.manual_ack_set(True)  # the only way to PUBACK after the PubAck
    done = 0
    async with client:
        await client.subscribe("bench/#", qos=1)
        async for message in client.messages:
            await js.publish(
                f"src.raw.{tag}",
                bytes(message.payload),  # type: ignore[arg-type]
                headers={"Nats-Msg-Id": f"raw:{message.mid}:{done}"},
            )
            client._client.ack(message.mid, message.qos)
            done += 1
            if done == count:
                break
    elapsed = time.perf_counter() - start
    await nc.close()
    return elapsed


async def _preload(url: str, subject: str, count: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(count):
        await js.publish_async(subject, PAYLOAD % i, headers={"Nats-Msg-Id": f"{subject}:{i}"})
    await js.publish_async_completed()
    await nc.close()


async def busway_sink(url: str, broker: MosquittoBroker, count: int, tag: str) -> float:
    stream = f"SNK_BUSWAY_{tag}"
    await _stream(url, stream, f"snk.busway.{tag}")
    await _preload(url, f"snk.busway.{tag}", count)
    bus = _bus(
        f'[nats]\nservers = ["{url}"]\n[[streams]]\nname = "{stream}"\n'
        f'subjects = ["snk.busway.{tag}"]\ncreate = false\n'
        f'[[sinks]]\nname = "s{tag}"\ntype = "mqtt"\nfrom = "snk.busway.{tag}"\n'
        f'topic = "bench/out"\nconnection = {{ url = "{broker.url}" }}\n'
    )
    start = time.perf_counter()
    async with bus:
        stats = next(s for s in bus.metrics.stats if s.name == f"s{tag}")
        while stats.published < count:  # noqa: ASYNC110 - a bench polls
            await anyio.sleep(0.01)
        return time.perf_counter() - start


async def raw_sink(url: str, broker: MosquittoBroker, count: int, tag: str) -> float:
    subject = f"snk.raw.{tag}"
    await _stream(url, f"SNK_RAW_{tag}", subject)
    await _preload(url, subject, count)
    start = time.perf_counter()
    nc = await nats.connect(url)
    js = nc.jetstream()
    pull = await js.pull_subscribe(subject, durable=f"raw{tag}")
    done = 0
    async with aiomqtt.Client("127.0.0.1", broker.port, max_inflight_messages=256) as client:
        while done < count:
            batch = await pull.fetch(256, timeout=5)
            await asyncio.gather(*(client.publish("bench/out", m.data, qos=1) for m in batch))
            for m in batch:
                await m.ack()
            done += len(batch)
    elapsed = time.perf_counter() - start
    await nc.close()
    return elapsed


async def main(count: int, rounds: int, sync: str) -> None:
    with tempfile.TemporaryDirectory() as store:
        server = NatsServer(Path(store), sync_always=sync == "always")
        broker = MosquittoBroker()
        try:
            times: dict[str, list[float]] = {
                k: [] for k in ("source", "raw source", "sink", "raw sink")
            }
            for r in range(rounds):
                tag = str(r)
                times["source"].append(await busway_source(server.url, broker, count, tag))
                times["raw source"].append(await raw_source(server.url, broker, count, tag))
                times["sink"].append(await busway_sink(server.url, broker, count, tag))
                times["raw sink"].append(await raw_sink(server.url, broker, count, tag))
        finally:
            broker.close()
            server.stop()
    rate = {k: count / statistics.median(v) for k, v in times.items()}
    print(f"{count} msgs x {rounds} rounds, nats sync {sync}, Mosquitto {broker.url}")
    for kind in ("source", "sink"):
        busway, raw = rate[kind], rate[f"raw {kind}"]
        print(
            f"  {kind:6}  busway {busway:8.0f} msg/s   hand-written {raw:8.0f} msg/s   "
            f"ratio {busway / raw:.2f}"
        )


if __name__ == "__main__":
    logging.getLogger("mqtt").setLevel(logging.ERROR)  # aiomqtt warns of many pending publishes
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync", choices=["always", "default"], default="always")
    args = parser.parse_args()
    asyncio.run(main(args.count, args.rounds, args.sync))
