"""Keyed partitions across daemons (`busway run` subprocesses): order per key, aggregate groups.

Each test runs real daemons on one config against the session's nats-server and kills one with
SIGKILL mid-run. What must hold afterwards:

* order: every key's outputs are stored in the order of its inputs, each once (a redelivery
  republishes the same `Nats-Msg-Id`, which the stream drops);
* aggregates: every group is published exactly once with all its members, never split between
  two daemons.

Without `partitioned = true` neither holds with several daemons: the issue measured 215-526
out-of-order pairs with 3 daemons and 88 of 1,000 groups split with 2.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from tests.configs import config_toml, stream_table
from tests.faults.helpers import consumer_settled
from tests.support import Daemon, Daemons, NatsServer, eventually, stream_messages

pytestmark = [pytest.mark.anyio, pytest.mark.slow, pytest.mark.timeout(600)]

PARTITIONS = 8
SINK_KEYS = 4
LEASE = "2s"


def _config(nats: NatsServer, unique: str, route: str) -> str:
    return config_toml(
        nats,
        top='shutdown_timeout = "5s"',
        http="",
        streams=[
            stream_table(f"IN_{unique}", f"in{unique}.*")
            + f"partition = {{ count = {PARTITIONS} }}\n",
            stream_table(f"OUT_{unique}", f"out{unique}.>"),
        ],
    ) + route.format(unique=unique, lease=LEASE)


async def _publish(nc: NatsClient, items: list[tuple[str, bytes]]) -> None:
    """Publish in order, pipelined (a window of PubAcks in flight), each with its own id."""
    js = nc.jetstream()
    window: list[asyncio.Future[object]] = []
    for index, (subject, body) in enumerate(items):
        future = await js.publish_async(subject, body, headers={"Nats-Msg-Id": f"in-{index}"})
        window.append(future)
        if len(window) >= 256:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)


async def _stored(nc: NatsClient, stream: str) -> int:
    return int((await nc.jetstream().stream_info(stream)).state.messages)


def _running_on(daemon: Daemon) -> int:
    """How many partitions `daemon` runs now, by its log."""
    output = daemon.output()
    return output.count("running here") - output.count("handed back")


async def _partitions_running(daemons: list[Daemon]) -> bool:
    """Every partition runs on one of `daemons` (each logged its share and started it)."""
    return sum(_running_on(daemon) for daemon in daemons) == PARTITIONS


ORDER_ROUTE = """
[[routes]]
name = "ordered{unique}"
from = "in{unique}.*"
stages = [{{ switch = {{ cases = [{{ when = "sink", to = ["out{unique}.sink"] }}], default = ["out{unique}.ordered"] }} }}]
partitioned = true
partition_lease_ttl = "{lease}"
max_in_flight = 1
ack_wait = "2s"

[[sinks]]
type = "file"
name = "keyed{unique}"
from = "out{unique}.sink"
path = "out.jsonl"
fsync = false
max_in_flight = 1
batch_wait = "0s"
ack_wait = "2s"
"""  # noqa: E501 - TOML inline tables cannot span lines


async def test_per_key_order_holds_across_three_daemons_and_a_sigkill(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path, daemons: Daemons
) -> None:
    keys, per_key = 20, 500
    config = tmp_path / "busway.toml"
    config.write_text(_config(nats_server, unique, ORDER_ROUTE))
    running = [daemons.start(config, log=tmp_path / f"d{i}.log") for i in range(3)]
    for daemon in running:
        await daemon.ready()

    async def fair_shares() -> bool:  # 8 partitions over 3 daemons: 3, 3 and 2
        return sorted(_running_on(daemon) for daemon in running) == [2, 3, 3]

    await eventually(fair_shares, timeout=60)
    items = [
        (f"in{unique}.k{key}", orjson.dumps({"key": f"k{key}", "n": n, "sink": key < SINK_KEYS}))
        for n in range(per_key)
        for key in range(keys)
    ]
    total = keys * per_key

    async def killer() -> None:
        async def a_third_done() -> bool:
            return await _stored(nc, f"OUT_{unique}") >= total // 3

        await eventually(a_third_done, timeout=120)
        running[1].kill()

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(killer)
        await _publish(nc, items)

    async def all_stored() -> bool:
        return await _stored(nc, f"OUT_{unique}") >= total

    await eventually(all_stored, timeout=180)
    print(f"[partitions:order] {total} messages in {time.monotonic() - started:.1f}s, 1 kill")
    outputs = await stream_messages(nc, f"OUT_{unique}")
    seen: dict[str, list[int]] = {}
    for message in outputs:
        document = orjson.loads(message.data)
        seen.setdefault(document["key"], []).append(document["n"])
    assert len(outputs) == total
    for key in range(keys):
        assert seen[f"k{key}"] == list(range(per_key)), f"k{key} out of order or incomplete"
    # At the sink (one consumer with max_in_flight 1 on the output stream, shared by the
    # daemons; the first SINK_KEYS keys only, a serial sink is slow): each key in order; a
    # line written by the killed daemon but not acked may be written again right after
    # itself, never after a later message of its key.

    async def sink_done() -> bool:
        return await consumer_settled(
            nats_server.url, f"OUT_{unique}", f"busway-sink-keyed{unique}"
        )

    await eventually(sink_done, timeout=180)
    lines: dict[str, list[int]] = {}
    for line in (tmp_path / "out.jsonl").read_bytes().splitlines():
        document = orjson.loads(line)
        lines.setdefault(document["key"], []).append(document["n"])
    repeats = 0
    assert sorted(lines) == sorted(f"k{key}" for key in range(SINK_KEYS))
    for key in range(SINK_KEYS):
        written = lines[f"k{key}"]
        collapsed = [n for i, n in enumerate(written) if i == 0 or written[i - 1] != n]
        repeats += len(written) - len(collapsed)
        assert collapsed == list(range(per_key)), f"k{key} out of order at the sink"
    print(f"[partitions:order] sink: {repeats} line(s) repeated in place after the kill")
    for daemon in (running[0], running[2]):
        assert daemon.process is not None
        assert daemon.process.poll() is None
    # The survivors took the killed daemon's partitions over.
    assert sum(d.output().count("running here") for d in (running[0], running[2])) > PARTITIONS - 3
    for daemon in (running[0], running[2]):
        assert await daemon.stop() == 0


GROUPS, MEMBERS = 1000, 3

AGGREGATE_ROUTE = """
[[routes]]
name = "groups{unique}"
from = "in{unique}.*"
to = ["out{unique}.groups"]
partitioned = true
partition_lease_ttl = "{lease}"
max_in_flight = 256
ack_wait = "2s"
retry = {{ max_attempts = 100, backoff = "50ms", max_backoff = "200ms" }}
stages = [{{ aggregate = {{ by = "g", count = 3, timeout = "120s", into = "{{g: key, members: messages[].m}}" }} }}]
"""  # noqa: E501 - TOML inline tables cannot span lines


def _group_inputs(unique: str) -> list[tuple[str, bytes]]:
    """Members of 1,000 groups, interleaved: groups open in a window of 50 at a time."""
    items: list[tuple[str, bytes]] = []
    window = 50
    for start in range(0, GROUPS, window):
        for member in range(MEMBERS):
            for group in range(start, start + window):
                body = orjson.dumps({"g": f"g{group}", "m": member})
                items.append((f"in{unique}.g{group}", body))
    return items


async def test_aggregate_groups_stay_whole_across_two_daemons_and_a_sigkill(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path, daemons: Daemons
) -> None:
    config = tmp_path / "busway.toml"
    config.write_text(_config(nats_server, unique, AGGREGATE_ROUTE))
    running = [daemons.start(config, log=tmp_path / f"d{i}.log") for i in range(2)]
    for daemon in running:
        await daemon.ready()

    async def shared_out() -> bool:
        return await _partitions_running(running) and all(
            "running here" in daemon.output() for daemon in running
        )

    await eventually(shared_out, timeout=60)

    async def killer() -> None:
        async def a_third_done() -> bool:
            return await _stored(nc, f"OUT_{unique}") >= GROUPS // 3

        await eventually(a_third_done, timeout=120)
        running[1].kill()
        killed.append(time.monotonic())

    killed: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(killer)
        await _publish(nc, _group_inputs(unique))

    async def survivor_runs_all() -> bool:
        return await _partitions_running(running[:1])

    await eventually(survivor_runs_all, timeout=60)
    took = time.monotonic() - killed[0]
    print(f"[partitions:aggregate] the survivor runs every partition {took:.1f}s after the kill")

    async def all_groups() -> bool:
        return await _stored(nc, f"OUT_{unique}") >= GROUPS

    await eventually(all_groups, timeout=180)
    outputs = await stream_messages(nc, f"OUT_{unique}")
    groups = sorted(
        (doc["g"], sorted(doc["members"])) for doc in map(orjson.loads, (m.data for m in outputs))
    )
    assert groups == sorted((f"g{g}", list(range(MEMBERS))) for g in range(GROUPS))
    assert "held by the previous run" in running[0].output()  # the restart path ran
    assert await running[0].stop() == 0
