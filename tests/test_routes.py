"""Routes through the library API against a real nats-server: the delivery contract end to end."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import generate_latest

from busway import Bus
from tests.configs import config_toml, io_streams
from tests.support import (
    NatsServer,
    consumer_settled,
    decode_test_config,
    eventually,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def route_config(server: NatsServer, unique: str, route: str, *, extra: str = "") -> str:
    return (
        config_toml(server, publish_timeout="2s", streams=io_streams(unique))
        + f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
{route}
{extra}
"""
    )


async def publish_inputs(nc: NatsClient, subject: str, bodies: list[bytes]) -> None:
    js = nc.jetstream()
    for body in bodies:
        await js.publish(subject, body)


async def test_fan_out_stores_each_match_once_on_every_target(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(
            nats_server,
            unique,
            f"""when = "total > `100` && status == 'paid'"
transform = "{{id: id, total: total, customer: customer.name}}"
to = ["out{unique}.a", "out{unique}.b"]""",
        ),
        tmp_path,
    )
    orders = [
        {
            "id": i,
            "total": 50 * i,
            "status": "paid" if i % 2 else "open",
            "customer": {"name": f"c{i}"},
        }
        for i in range(10)
    ]
    async with Bus(config) as bus:
        await publish_inputs(nc, f"in{unique}.orders", [orjson.dumps(order) for order in orders])

        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        stats = bus.metrics.stats[0]
        matching = [o for o in orders if o["total"] > 100 and o["status"] == "paid"]
        assert stats.received == 10
        assert stats.filtered == 10 - len(matching)
        assert stats.published == 2 * len(matching)

    outputs = await stream_messages(nc, f"OUT_{unique}")
    expected = [
        {"id": o["id"], "total": o["total"], "customer": o["customer"]["name"]} for o in matching
    ]
    for target in ("a", "b"):
        bodies = [orjson.loads(m.data) for m in outputs if m.subject == f"out{unique}.{target}"]
        assert bodies == expected
    assert len(outputs) == 2 * len(matching)
    ids = [m.headers["Nats-Msg-Id"] for m in outputs if m.headers]
    assert len(set(ids)) == len(outputs)


async def test_unmatched_messages_are_acked_and_not_forwarded(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(nats_server, unique, f'when = "total > `100`"\nto = ["out{unique}.big"]'),
        tmp_path,
    )
    async with Bus(config) as bus:
        await publish_inputs(nc, f"in{unique}.orders", [b'{"total": 5}'] * 25)

        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        assert bus.metrics.stats[0].filtered == 25
        assert bus.metrics.stats[0].dead_lettered == 0
    info = await nc.jetstream().stream_info(f"OUT_{unique}")
    assert info.state.messages == 0


async def test_bad_json_is_dead_lettered_with_its_reason_and_counted(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(nats_server, unique, f'when = "total > `1`"\nto = ["out{unique}.big"]'),
        tmp_path,
    )
    async with Bus(config) as bus:
        await publish_inputs(nc, f"in{unique}.orders", [b"{not json", b'{"total": 7}'])

        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        metrics = generate_latest(bus.metrics_registry).decode()

    assert (
        f'busway_messages_dead_lettered_total{{component="r{unique}",kind="route"}} 1.0' in metrics
    )
    assert (
        f'busway_errors_total{{component="r{unique}",kind="route",reason="decode"}} 1.0' in metrics
    )
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.r{unique}"
    ]
    assert len(dead) == 1
    headers = dead[0].headers or {}
    assert dead[0].data == b"{not json"
    assert headers["Busway-Error-Reason"] == "decode"
    assert "not valid JSON" in headers["Busway-Error"]
    assert headers["Busway-Component"] == f"r{unique}"
    assert headers["Busway-Original-Subject"] == f"in{unique}.orders"
    assert headers["Busway-Original-Stream"] == f"IN_{unique}"
    assert headers["Busway-Original-Sequence"] == "1"
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert [orjson.loads(m.data) for m in outputs] == [{"total": 7}]


async def test_expression_error_is_dead_lettered_with_the_expression(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(nats_server, unique, f'transform = "abs(name)"\nto = ["out{unique}.x"]'),
        tmp_path,
    )
    async with Bus(config):
        await publish_inputs(nc, f"in{unique}.orders", [b'{"name": "Ada"}'])

        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.r{unique}"
    ]
    assert len(dead) == 1
    headers = dead[0].headers or {}
    assert headers["Busway-Error-Reason"] == "expression"
    assert headers["Busway-Expression"] == "abs(name)"
    assert "transform" in headers["Busway-Error"]


async def test_reprocessing_inputs_adds_no_duplicate_outputs(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """A redelivered input republishes the same message ids, which the output stream drops."""
    config = decode_test_config(
        route_config(nats_server, unique, f'to = ["out{unique}.copy"]'), tmp_path
    )
    durable = f"busway-route-r{unique}"

    async def settled() -> bool:
        return await consumer_settled(nc, f"IN_{unique}", durable)

    async with Bus(config):
        await publish_inputs(nc, f"in{unique}.orders", [b'{"n": %d}' % i for i in range(50)])
        await eventually(settled)
    # Forget every ack: a new consumer delivers all 50 inputs again.
    await nc.jetstream().delete_consumer(f"IN_{unique}", durable)
    async with Bus(config) as bus:
        await eventually(settled)
        assert bus.metrics.stats[0].received == 50
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert [orjson.loads(m.data)["n"] for m in outputs] == list(range(50))


async def test_failed_publish_is_retried_until_the_stream_exists(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(
            nats_server,
            unique,
            f'to = ["out{unique}.x"]',
            extra='retry = { max_attempts = 100, backoff = "50ms", max_backoff = "200ms" }',
        ),
        tmp_path,
    )
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.delete_stream(f"OUT_{unique}")  # publishes now get "no responders"
        await publish_inputs(nc, f"in{unique}.orders", [b'{"n": 1}'])
        stats = bus.metrics.stats[0]

        async def retried_twice() -> bool:
            return stats.retried >= 2

        await eventually(retried_twice)
        await js.add_stream(name=f"OUT_{unique}", subjects=[f"out{unique}.>"])

        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        assert stats.errors["publish"] >= 2
        assert stats.dead_lettered == 0
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert [m.data for m in outputs] == [b'{"n": 1}']


async def test_exhausted_retries_dead_letter_with_the_last_error(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(
            nats_server,
            unique,
            f'to = ["out{unique}.x"]',
            extra='retry = { max_attempts = 2, backoff = "50ms", max_backoff = "100ms" }',
        ),
        tmp_path,
    )
    async with Bus(config) as bus:
        await nc.jetstream().delete_stream(f"OUT_{unique}")
        await publish_inputs(nc, f"in{unique}.orders", [b'{"n": 1}'])

        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        # Two attempts: the first is retried, the second (the last allowed) dead-letters.
        assert bus.metrics.stats[0].retried == 1
        assert bus.metrics.stats[0].dead_lettered == 1
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.r{unique}"
    ]
    assert len(dead) == 1
    headers = dead[0].headers or {}
    assert headers["Busway-Error-Reason"] == "max_attempts"
    assert headers["Busway-Attempts"] == "2"
    assert "no stream captures subject" in headers["Busway-Error"]


async def test_graceful_stop_settles_everything_it_holds(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Leaving the bus mid-flow acks what is done and naks the rest for immediate redelivery.

    `ack_wait` is a minute here: were any message left un-acked, the restarted bus could not
    finish within the polling timeout below.
    """
    config = decode_test_config(
        route_config(
            nats_server,
            unique,
            f'to = ["out{unique}.copy"]',
            extra='max_in_flight = 500\nack_wait = "60s"',
        ),
        tmp_path,
    )
    js = nc.jetstream(publish_async_max_pending=1000)
    await js.add_stream(name=f"IN_{unique}", subjects=[f"in{unique}.>"])
    for i in range(5000):  # all queued before the route starts, so the stop lands mid-flow
        await js.publish_async(f"in{unique}.orders", b'{"n": %d}' % i)
    await js.publish_async_completed()
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]

        async def flowing() -> bool:
            return stats.published >= 500

        await eventually(flowing)
    assert stats.in_flight == 0
    stored = (await js.stream_info(f"OUT_{unique}")).state.messages
    assert stored == stats.published
    assert stored < 5000, "the stop must land mid-flow for this test to mean anything"

    async with Bus(config):
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}", timeout=25)
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert sorted(orjson.loads(m.data)["n"] for m in outputs) == list(range(5000))


async def test_route_matches_on_headers_and_reads_the_subject(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        route_config(
            nats_server,
            unique,
            f"""when = "header('X-Tier') == 'gold'"
transform = "{{id: id, from: subject(), seq: meta('seq')}}"
to = ["out{unique}.gold"]""",
        ),
        tmp_path,
    )
    js = nc.jetstream()
    async with Bus(config):
        await js.publish(f"in{unique}.orders", b'{"id": 1}', headers={"X-Tier": "gold"})
        await js.publish(f"in{unique}.orders", b'{"id": 2}', headers={"X-Tier": "basic"})
        await js.publish(f"in{unique}.orders", b'{"id": 3}')
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert [orjson.loads(m.data) for m in outputs] == [
        {"id": 1, "from": f"in{unique}.orders", "seq": 1}
    ]
    assert outputs[0].headers
    assert outputs[0].headers["X-Tier"] == "gold"
