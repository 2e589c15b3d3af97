"""SIGKILL inside aggregate groups: 10 kills while groups of 10 lines by order accumulate.

The daemon (`busway run`) aggregates lines by `order`, 10 to a group (with a `timeout` far
longer than a restart), from a stream the test fills directly on its own nats-server: each
order has 30 lines, a few orders are open at once, their lines interleaved and published in
order at a steady pace, and the
daemon is killed at random points, half of them just after an aggregate was stored (between
its PubAck and the acks of its inputs), and restarted. The outcome is exact: the groups a run
without kills forms, three per order, lines 0-9, 10-19 and 20-29, each line once. A group
split by a kill (lines held before it grouped with later ones, the rest in another group),
published twice, or stranded (inputs held forever) fails the test.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import nats
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled, message_id, read_stream
from tests.support import Daemon, NatsServer, eventually

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

KILLS = 10
GROUP = 10
LINES = 3 * GROUP  # lines per order
OPEN_ORDERS = 6  # orders whose lines are interleaved at any time
PACE = 0.005  # seconds between two lines


def daemon_config(nats_url: str) -> str:
    return (
        config_toml(
            nats_url,
            top='shutdown_timeout = "5s"',
            streams=[stream_table("AGG_IN", "aggin.>"), stream_table("AGG_OUT", "aggout.>")],
        )
        + f"""
[[routes]]
name = "orders"
from = "aggin.lines"
to = ["aggout.orders"]
ack_wait = "1s"
retry = {{ max_attempts = 100, backoff = "50ms", max_backoff = "200ms" }}
stages = [{{ aggregate = {{ by = "order", count = {GROUP}, timeout = "20s", into = "{{order: key, lines: messages[].line}}" }} }}]
"""  # noqa: E501 - TOML inline tables cannot span lines
    )


class Lines:
    """Publishes the lines of orders 0, 1, 2... (LINES each), OPEN_ORDERS orders interleaved."""

    def __init__(self, js: nats.js.JetStreamContext, rng: random.Random) -> None:
        self.js = js
        self.rng = rng
        self.published = 0
        self.orders = 0
        self._open: dict[int, int] = {}  # order -> lines published so far

    async def publish_until(self, stop: anyio.Event) -> None:
        """Publish at a steady pace until `stop`, then finish every order already begun."""
        while not stop.is_set() or self._open:
            if not stop.is_set():
                while len(self._open) < OPEN_ORDERS:
                    self._open[self.orders] = 0
                    self.orders += 1
            order = self.rng.choice(sorted(self._open))
            line = self._open[order]
            body = orjson.dumps({"order": f"o{order}", "line": line})
            await self.js.publish("aggin.lines", body, headers={"Nats-Msg-Id": f"o{order}-{line}"})
            self.published += 1
            if line + 1 == LINES:
                del self._open[order]
            else:
                self._open[order] = line + 1
            await anyio.sleep(PACE)


async def test_ten_sigkills_inside_groups_split_and_duplicate_no_group(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store, sync_always=True)
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url))
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    seed = int(os.environ.get("BUSWAY_FAULT_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    client = await nats.connect(server.url)
    lines = Lines(client.jetstream(), rng)
    stop = anyio.Event()
    kills: list[int] = []

    stored = anyio.Event()

    async def on_aggregate(_: object) -> None:
        stored.set()

    # Aggregates as they are stored: half the kills follow one at once, to land between a
    # group's PubAck and the acks of its inputs.
    await client.subscribe("aggout.orders", cb=on_aggregate)

    async def kill_repeatedly() -> None:
        nonlocal stored
        for kill in range(KILLS):
            before = lines.published

            async def flowing(before: int = before) -> bool:
                return lines.published >= before + rng.randrange(20, 200)

            await eventually(flowing, timeout=120)
            if kill % 2:
                stored = anyio.Event()
                with anyio.fail_after(60):
                    await stored.wait()
                await anyio.sleep(rng.uniform(0, 0.002))
            daemon.kill()
            kills.append(lines.published)
            daemon.start()
            await daemon.ready()
        stop.set()

    try:
        daemon.start()
        await daemon.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(lines.publish_until, stop)
            tg.start_soon(kill_repeatedly)

        async def drained() -> bool:
            return await consumer_settled(server.url, "AGG_IN", "busway-route-orders")

        settled = True
        try:
            await eventually(drained, timeout=120)
        except AssertionError:
            settled = False  # inputs stranded: reported with the figures below
        assert await daemon.stop() == 0
        outputs = await read_stream(server.url, "AGG_OUT")
    finally:
        await client.close()
        daemon.kill()
        server.stop()
    aggregates = [orjson.loads(m.data) for m in outputs]
    groups = sorted((a["order"], sorted(a["lines"])) for a in aggregates)
    expected = sorted(
        (f"o{order}", list(range(start, start + GROUP)))
        for order in range(lines.orders)
        for start in range(0, LINES, GROUP)
    )
    figures = Figures.of(
        "aggregate-sigkill:lines",
        [(f"o{order}", line) for order in range(lines.orders) for line in range(LINES)],
        [(a["order"], line) for a in aggregates for line in a["lines"]],
        kills=len(kills),
        orders=lines.orders,
        aggregates=len(aggregates),
        regrouped=len(set(map(repr, groups)) ^ set(map(repr, expected))),
        settled=settled,
        seed=seed,
    ).report()
    print(f"[fault:aggregate-sigkill] published lines at each kill {kills}")

    assert len(kills) == KILLS
    assert settled, "inputs still held or pending after the drain"
    assert (figures.lost, figures.duplicated) == (0, 0), figures
    # Exactly the groups of a run without kills: none split, none published twice.
    assert groups == expected, figures
    assert len({message_id(m) for m in outputs}) == len(outputs)
