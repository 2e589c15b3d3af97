"""The amqp sink against a real RabbitMQ node: confirms, mandatory routing, nacks, exchanges."""

from __future__ import annotations

import uuid
from pathlib import Path

import orjson
import pytest

from busway import BatchError, Message, StartupError
from busway.adapters.amqp._config import AmqpSinkConfig
from busway.adapters.amqp.sink import AmqpSink
from busway.testing import start_bus
from tests.amqp.client import rabbit
from tests.amqp.servers import RabbitServer
from tests.support import eventually

pytestmark = pytest.mark.anyio


def _config(server: RabbitServer, exchange: str, routing_key: str, extra: str = "") -> str:
    return f"""
[[streams]]
name = "OUT"
subjects = ["out.>"]

[[sinks]]
name = "rabbit-out"
type = "amqp"
from = "out.>"
url = "{server.url}"
exchange = "{exchange}"
routing_key = "{routing_key}"
retry = {{ backoff = "100ms", max_backoff = "200ms" }}
{extra}
"""


def _message(key: str, headers: dict[str, str] | None = None) -> Message:
    return Message(
        subject="out.x",
        data=orjson.dumps({"key": key}),
        headers={"Nats-Msg-Id": key, **(headers or {})},
        id=key,
        stream="OUT",
        sequence=1,
        attempt=1,
    )


async def test_delivers_with_busway_ids_and_dead_letters_the_unroutable(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(rabbit_server.url) as client:
        queue = await client.queue()
        exchange = await client.exchange(bind={queue: "orders.*"})
        config = _config(rabbit_server, exchange, "{subject[1]}.{body.region}")
        async with start_bus(config, directory=tmp_path) as harness:
            await harness.publish(
                "out.orders", {"region": "eu"}, id="o-1", headers={"X-Tenant": "acme"}
            )
            await harness.publish("out.orders", {"region": "us"}, id="o-2")
            await harness.publish("out.refunds", {"region": "eu"}, id="r-1")  # no binding

            async def settled() -> bool:
                stats = harness.stats("rabbit-out")
                return stats.published == 2 and stats.dead_lettered == 1

            await eventually(settled, timeout=30)
            [dead] = await harness.stored("BUSWAY_DEADLETTER")
        got = await client.drain(queue)
    assert [(g.message_id, g.routing_key) for g in got] == [
        ("o-1", "orders.eu"),
        ("o-2", "orders.us"),
    ]
    assert got[0].delivery_mode == 2  # persistent
    assert got[0].headers == {"X-Tenant": "acme"}  # no Nats-* header leaks out
    assert dead.headers["Busway-Error-Reason"] == "unroutable"
    assert "NO_ROUTE" in dead.headers["Busway-Error"]
    assert "message r-1 to exchange" in dead.headers["Busway-Error"]


async def test_a_nack_from_the_broker_is_retried_until_confirmed(
    rabbit_server: RabbitServer, tmp_path: Path
) -> None:
    async with rabbit(rabbit_server.url) as client:
        # A full queue that refuses more: RabbitMQ nacks each publish routed only to it.
        queue = await client.queue(**{"x-max-length": 1, "x-overflow": "reject-publish"})
        await client.publish(queue, b"filler", message_id="filler")
        async with start_bus(_config(rabbit_server, "", queue), directory=tmp_path) as harness:
            await harness.publish("out.x", {"k": 1}, id="waits")

            async def nacked() -> bool:
                return harness.stats("rabbit-out").errors.get("nacked", 0) >= 1

            await eventually(nacked, timeout=30)
            assert harness.stats("rabbit-out").published == 0
            [filler] = await client.drain(queue)  # room again

            async def delivered() -> bool:
                return harness.stats("rabbit-out").published == 1

            await eventually(delivered, timeout=30)
            assert harness.stats("rabbit-out").dead_lettered == 0
        [got] = await client.drain(queue)
    assert (filler.message_id, got.message_id) == ("filler", "waits")


async def test_a_missing_literal_exchange_refuses_start(rabbit_server: RabbitServer) -> None:
    exchange = f"absent-{uuid.uuid4().hex[:8]}"
    sink = AmqpSink(
        AmqpSinkConfig(name="s", from_="out.>", url=rabbit_server.url, exchange=exchange)
    )
    with pytest.raises(StartupError, match=f"exchange '{exchange}' does not exist"):
        await sink.open()
    await sink.close()


async def test_a_templated_exchange_that_does_not_exist_fails_only_its_messages(
    rabbit_server: RabbitServer,
) -> None:
    async with rabbit(rabbit_server.url) as client:
        queue = await client.queue()
        exchange = await client.exchange(bind={queue: "#"})
        sink = AmqpSink(
            AmqpSinkConfig(
                name="s",
                from_="out.>",
                url=rabbit_server.url,
                exchange="{header.X-Exchange}",
                routing_key="k",
            )
        )
        await sink.open()
        try:
            with pytest.raises(BatchError) as caught:
                await sink.write(
                    [
                        _message("a", {"X-Exchange": exchange}),
                        _message("b", {"X-Exchange": "no-such-exchange"}),
                        _message("c", {"X-Exchange": exchange}),
                    ]
                )
            assert sorted(caught.value.failures) == [1]
            assert getattr(caught.value.failures[1], "reason", "") == "no_exchange"
            assert sink.ready()
        finally:
            await sink.close()
        assert [g.message_id for g in await client.drain(queue)] == ["a", "c"]
