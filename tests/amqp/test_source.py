"""The amqp source against a real RabbitMQ node: ack after the PubAck, ids, malformed input.

aio-pika (like its aiormq core) gives every message it publishes a random `message_id` when
the application sets none, so the hash fallback for messages without one, and
`require_message_id`, are checked in test_inbound.py rather than through this client.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest

from busway.testing import start_bus
from tests.amqp.client import rabbit
from tests.amqp.servers import RabbitServer
from tests.support import eventually

pytestmark = pytest.mark.anyio


def _config(server: RabbitServer, queue: str, extra: str = "") -> str:
    return f"""
[[streams]]
name = "IN"
subjects = ["rabbit.>"]

[[sources]]
name = "rabbit-in"
type = "amqp"
url = "{server.url}"
queue = "{queue}"
subject = "rabbit.in"
{extra}
"""


async def test_each_message_is_stored_once_then_acked_at_the_broker(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(rabbit_server.url) as client:
        queue = await client.queue()
        async with start_bus(_config(rabbit_server, queue), directory=tmp_path) as harness:
            for i in range(20):
                await client.publish(queue, orjson.dumps({"n": i}), message_id=f"m{i}")
            await client.publish(queue, b"again", message_id="m3")  # the same id: a repeat

            async def all_taken() -> bool:
                return harness.stats("rabbit-in").published == 21 and (
                    await client.depth(queue)
                ) == (0, 1)

            await eventually(all_taken)
            stored = await harness.stored("IN")
        assert [m.id for m in stored] == [f"rabbit-in:m{i}" for i in range(20)]
        assert stored[0].headers["Amqp-Routing-Key"] == queue
        assert orjson.loads(stored[5].data) == {"n": 5}


async def test_malformed_json_is_dead_lettered_with_its_reason_and_acked(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(rabbit_server.url) as client:
        queue = await client.queue()
        config = _config(rabbit_server, queue, 'format = "json"')
        async with start_bus(config, directory=tmp_path) as harness:
            await client.publish(queue, b'{"ok": 1}', message_id="good")
            await client.publish(queue, b"<xml/>", message_id="xml", content_type="text/xml")
            await client.publish(queue, b"\x1f\x8b", message_id="zip", content_encoding="gzip")
            await client.publish(queue, b"{not json", message_id="broken")

            async def settled() -> bool:
                stats = harness.stats("rabbit-in")
                return stats.published == 1 and stats.dead_lettered == 3

            await eventually(settled)
            assert await client.depth(queue) == (0, 1)  # every delivery acked
            stored = await harness.stored("IN")
            dead = await harness.stored("BUSWAY_DEADLETTER")
            assert harness.stats("rabbit-in").errors.get("malformed") == 3
        assert [m.id for m in stored] == ["rabbit-in:good"]
        reasons = {m.headers["Amqp-Message-Id"]: m.headers["Busway-Error"] for m in dead}
        assert {m.headers["Busway-Error-Reason"] for m in dead} == {"malformed"}
        assert "content type 'text/xml' is not JSON" in reasons["xml"]
        assert "content encoding 'gzip'" in reasons["zip"]
        assert "body is not JSON" in reasons["broken"]
        assert {m.headers["Busway-Origin"] for m in dead} == {f"queue {queue}"}


async def test_reject_sends_malformed_messages_to_the_queues_dead_letter_exchange(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(rabbit_server.url) as client:
        parked = await client.queue()
        dlx = await client.exchange(bind={parked: "#"})
        queue = await client.queue(**{"x-dead-letter-exchange": dlx})
        config = _config(rabbit_server, queue, 'format = "json"\non_malformed = "reject"')
        async with start_bus(config, directory=tmp_path) as harness:
            await client.publish(queue, b"{not json", message_id="broken")
            await client.publish(queue, b'{"ok": 1}', message_id="good")

            async def settled() -> bool:
                return (
                    harness.stats("rabbit-in").published == 1
                    and (await client.depth(parked))[0] == 1
                )

            await eventually(settled)
            dead = await harness.stored("BUSWAY_DEADLETTER")
        assert dead == []
        [moved] = await client.drain(parked)
        assert (moved.body, moved.message_id) == (b"{not json", "broken")


async def test_a_missing_queue_refuses_start_and_declare_creates_it(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    from busway import StartupError

    queue = f"absent-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StartupError, match=f"queue '{queue}'.*does not exist"):
        async with start_bus(_config(rabbit_server, queue), directory=tmp_path / "a"):
            pass
    config = _config(rabbit_server, queue, "declare = true")
    async with (
        rabbit(rabbit_server.url) as client,
        start_bus(config, directory=tmp_path / "b") as harness,
    ):
        await client.publish(queue, b"x", message_id="declared")

        async def stored() -> bool:
            return harness.stats("rabbit-in").published == 1

        await eventually(stored)


async def test_a_deleted_queue_is_waited_for_and_consumed_again_once_back(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(rabbit_server.url) as client:
        queue = await client.queue()
        async with start_bus(_config(rabbit_server, queue), directory=tmp_path) as harness:
            await client.publish(queue, b"first", message_id="m1")

            async def first() -> bool:
                return harness.stats("rabbit-in").published == 1

            await eventually(first)
            await client.channel.queue_delete(queue)  # the broker cancels the consumer

            async def noticed() -> bool:
                return not harness.stats("rabbit-in").ready

            await eventually(noticed)
            await client.queue(queue)
            await client.publish(queue, b"second", message_id="m2")

            async def second() -> bool:
                return harness.stats("rabbit-in").published == 2

            await eventually(second, timeout=60)
            stored = await harness.stored("IN")
        assert [m.id for m in stored] == ["rabbit-in:m1", "rabbit-in:m2"]
