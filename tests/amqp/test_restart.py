"""A RabbitMQ restart in the middle of the flow loses nothing, in either direction.

These tests restart their own node (the session's one serves the others undisturbed).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest

from busway.testing import start_bus
from tests.amqp.client import rabbit
from tests.amqp.conftest import require_rabbitmq
from tests.amqp.servers import RabbitServer
from tests.support import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


@pytest.fixture(scope="module")
def own_rabbit() -> Iterator[RabbitServer]:
    """A node of this module's own, to restart."""
    require_rabbitmq()
    server = RabbitServer()
    yield server
    server.close()


async def test_source_loses_nothing_when_the_broker_restarts(
    own_rabbit: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(own_rabbit.url) as client:
        queue = await client.queue()
        for i in range(200):
            await client.publish(queue, orjson.dumps({"n": i}), message_id=f"m{i}")
    config = f"""
[[streams]]
name = "IN"
subjects = ["rabbit.>"]

[[sources]]
name = "src"
type = "amqp"
url = "{own_rabbit.url}"
queue = "{queue}"
subject = "rabbit.in"
prefetch = 16
"""
    async with start_bus(config, directory=tmp_path) as harness:

        async def midway() -> bool:
            return harness.stats("src").published >= 30

        await eventually(midway, timeout=60)
        await anyio.to_thread.run_sync(own_rabbit.restart)
        async with rabbit(own_rabbit.url) as client:
            for i in range(200, 300):
                await client.publish(queue, orjson.dumps({"n": i}), message_id=f"m{i}")

            async def drained() -> bool:
                stored = len(await harness.stored("IN"))
                return stored >= 300 and (await client.depth(queue)) == (0, 1)

            await eventually(drained, timeout=120)
        stored = await harness.stored("IN")
    ids = Counter(message.id for message in stored)
    assert set(ids) == {f"src:m{i}" for i in range(300)}
    assert max(ids.values()) == 1, "a message was stored twice"


async def test_sink_loses_nothing_when_the_broker_restarts(
    own_rabbit: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(own_rabbit.url) as client:
        queue = await client.queue()
        exchange = await client.exchange(bind={queue: "#"})
    config = f"""
[[streams]]
name = "OUT"
subjects = ["out.>"]

[[sinks]]
name = "snk"
type = "amqp"
from = "out.>"
url = "{own_rabbit.url}"
exchange = "{exchange}"
batch_size = 16
retry = {{ backoff = "100ms", max_backoff = "500ms", max_attempts = 1000 }}
circuit = {{ failures = 5, cool_down = "500ms" }}
"""
    async with start_bus(config, directory=tmp_path) as harness:
        for i in range(300):
            await harness.publish("out.x", {"n": i}, id=f"k{i}")

        async def midway() -> bool:
            return harness.stats("snk").published >= 30

        await eventually(midway, timeout=60)
        await anyio.to_thread.run_sync(own_rabbit.restart)

        async def delivered() -> bool:
            return harness.stats("snk").published >= 300

        await eventually(delivered, timeout=180)
        assert harness.stats("snk").dead_lettered == 0
    async with rabbit(own_rabbit.url) as client:
        got = await client.drain(queue)
    ids = {g.message_id for g in got}  # a consumer dedupes on message_id
    assert ids == {f"k{i}" for i in range(300)}
    for g in got:
        assert g.message_id == f"k{orjson.loads(g.body)['n']}"


async def test_startup_timeout_waits_for_a_broker_that_comes_up_late(
    own_rabbit: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(own_rabbit.url) as client:
        queue = await client.queue()
    await anyio.to_thread.run_sync(own_rabbit.stop)
    config = f"""
[[streams]]
name = "IN"
subjects = ["rabbit.>"]

[[sources]]
name = "late"
type = "amqp"
url = "{own_rabbit.url}"
queue = "{queue}"
subject = "rabbit.in"
startup_timeout = "120s"
"""
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, own_rabbit.start)
        async with start_bus(config, directory=tmp_path) as harness:
            async with rabbit(own_rabbit.url) as client:
                await client.publish(queue, b"after the wait", message_id="late-1")

            async def stored() -> bool:
                return harness.stats("late").published == 1

            await eventually(stored, timeout=60)
            [message] = await harness.stored("IN")
    assert message.id == "late:late-1"
