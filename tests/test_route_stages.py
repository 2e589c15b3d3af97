"""Route stages through a real nats-server: outputs stored, inputs acked, errors dead-lettered."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Bus
from busway._nats.jetstream import ensure_consumer, state_bucket
from tests.configs import config_toml, io_streams
from tests.support import (
    NatsServer,
    decode_test_config,
    eventually,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def config_text(server: NatsServer, unique: str, routes: str) -> str:
    return config_toml(server, publish_timeout="2s", streams=io_streams(unique), body=routes)


async def publish_all(nc: NatsClient, subject: str, bodies: list[Any]) -> None:
    js = nc.jetstream()
    for body in bodies:
        await js.publish(subject, orjson.dumps(body))


async def outputs_of(nc: NatsClient, unique: str) -> list[Msg]:
    return await stream_messages(nc, f"OUT_{unique}")


async def dead_letters(nc: NatsClient, route: str) -> list[Msg]:
    return [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.{route}"
    ]


async def test_switch_split_headers_and_wiretap(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
stages = [
  {{ wiretap = "out{unique}.audit" }},
  {{ split = {{ on = "lines", correlation_id = "id" }} }},
  {{ set_headers = {{ "X-Sku" = "sku" }} }},
  {{ switch = {{ cases = [{{ when = "qty > `10`", to = ["out{unique}.bulk"] }}], default = ["out{unique}.retail"] }} }},
]
"""  # noqa: E501 - TOML inline tables cannot span lines
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    orders = [
        {"id": "o1", "lines": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 50}]},
        {"id": "o2", "lines": []},
        {"id": "o3", "lines": [{"sku": "c", "qty": 11}]},
    ]
    async with Bus(config) as bus:
        await publish_all(nc, f"in{unique}.orders", orders)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        stats = bus.metrics.stats[0]
        assert (stats.received, stats.published, stats.dead_lettered) == (3, 3, 0)

    stored = await outputs_of(nc, unique)
    by_subject: dict[str, list[Any]] = {}
    for message in stored:
        by_subject.setdefault(message.subject.rpartition(".")[2], []).append(message)
    assert [orjson.loads(m.data) for m in by_subject["audit"]] == orders
    assert [orjson.loads(m.data) for m in by_subject["retail"]] == [{"sku": "a", "qty": 1}]
    assert [orjson.loads(m.data) for m in by_subject["bulk"]] == [
        {"sku": "b", "qty": 50},
        {"sku": "c", "qty": 11},
    ]
    headers = [m.headers or {} for m in by_subject["bulk"]]
    assert [(h["X-Sku"], h["Busway-Correlation-Id"], h["Busway-Split-Index"]) for h in headers] == [
        ("b", "o1", "1"),
        ("c", "o3", "0"),
    ]
    assert len({(m.headers or {})["Nats-Msg-Id"] for m in stored}) == len(stored) == 6


def poison(body: dict[str, Any]) -> dict[str, Any]:
    """A user transform that fails on one message every time (a poison message)."""
    if body.get("poison"):
        raise ValueError(f"cannot handle order {body['id']}")
    return {**body, "handled": True}


async def test_validation_failures_dead_letter_at_once_poison_after_max_attempts(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    (tmp_path / "order.json").write_text(
        '{"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}}'
    )
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
to = ["out{unique}.ok"]
retry = {{ max_attempts = 3, backoff = "20ms", max_backoff = "50ms" }}
stages = [
  {{ validate = {{ schema = "order.json" }} }},
  {{ python = "tests.test_route_stages:poison" }},
]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    async with Bus(config) as bus:
        await publish_all(
            nc,
            f"in{unique}.orders",
            [{"id": 1}, {"id": "two"}, {"id": 3, "poison": True}, {"id": 4}],
        )
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        stats = bus.metrics.stats[0]
        assert stats.dead_lettered == 2
        assert stats.retried == 2  # the poison's attempts 1 and 2; the 3rd dead-letters it

    assert [orjson.loads(m.data) for m in await outputs_of(nc, unique)] == [
        {"id": 1, "handled": True},
        {"id": 4, "handled": True},
    ]
    dead = {
        orjson.loads(m.data)["id"]: m.headers or {} for m in await dead_letters(nc, f"r{unique}")
    }
    assert dead["two"]["Busway-Error-Reason"] == "validation"
    assert dead["two"]["Busway-Validation-Path"] == "$.id"
    assert dead["two"]["Busway-Stage"] == "stages[0].validate"
    assert dead[3]["Busway-Error-Reason"] == "max_attempts"
    assert (
        "tests.test_route_stages:poison raised ValueError: cannot handle order 3"
        in (dead[3]["Busway-Error"])
    )


async def test_enrich_asks_a_route_that_replies(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "lookup{unique}"
from = "in{unique}.customers"
stages = [
  {{ transform = "{{name: join(' ', [first, last]), vip: id == `7`}}" }},
  {{ reply = "@" }},
]

[[routes]]
name = "orders{unique}"
from = "in{unique}.orders"
to = ["out{unique}.enriched"]
stages = [
  {{ enrich = {{ request = "in{unique}.customers", body = "customer", into = "customer" }} }},
]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    orders = [
        {"id": i, "customer": {"id": i + 5, "first": "Ada", "last": f"L{i}"}} for i in range(4)
    ]
    async with Bus(config):
        await publish_all(nc, f"in{unique}.orders", orders)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-orders{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-lookup{unique}")

    enriched = sorted(
        (orjson.loads(m.data) for m in await outputs_of(nc, unique)), key=lambda o: o["id"]
    )
    assert enriched == [
        {"id": i, "customer": {"name": f"Ada L{i}", "vip": i + 5 == 7}} for i in range(4)
    ]


async def test_dedupe_drops_repeated_keys(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.events"
to = ["out{unique}.unique"]
stages = [{{ dedupe = {{ key = "event_id", window = "1m" }} }}]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    events = [{"event_id": i % 3, "n": i} for i in range(9)]
    async with Bus(config) as bus:
        await publish_all(nc, f"in{unique}.events", events)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        assert bus.metrics.stats[0].filtered == 6

    stored = [orjson.loads(m.data) for m in await outputs_of(nc, unique)]
    assert sorted(e["event_id"] for e in stored) == [0, 1, 2]


async def test_throttle_delays_but_delivers_everything(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.calls"
to = ["out{unique}.calls"]
stages = [{{ throttle = {{ rate = 5, per = "1s" }} }}]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    async with Bus(config):
        started = time.monotonic()
        await publish_all(nc, f"in{unique}.calls", [{"n": i} for i in range(12)])
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        elapsed = time.monotonic() - started

    stored = [orjson.loads(m.data)["n"] for m in await outputs_of(nc, unique)]
    assert sorted(stored) == list(range(12))
    # 5 pass at once, the other 7 at 5/s: at least 1.4 s, however fast the machine.
    assert elapsed >= 1.3


async def test_aggregate_by_count_and_timeout_acks_inputs_after_publishing(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.lines"
to = ["out{unique}.orders"]
stages = [
  {{ aggregate = {{ by = "order", count = 3, timeout = "1s", into = "{{order: key, skus: sort(messages[].sku)}}" }} }},
]
"""  # noqa: E501 - TOML inline tables cannot span lines
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    lines = [
        {"order": "a", "sku": "a1"},
        {"order": "b", "sku": "b1"},
        {"order": "a", "sku": "a2"},
        {"order": "c", "sku": "c1"},
        {"order": "b", "sku": "b2"},
        {"order": "a", "sku": "a3"},
        {"order": "b", "sku": "b3"},
    ]
    async with Bus(config) as bus:
        await publish_all(nc, f"in{unique}.lines", lines)
        # Group c never reaches 3 lines: its timeout publishes it with the one it has.
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        assert bus.metrics.stats[0].published == 3

    aggregates = {m.data for m in await outputs_of(nc, unique)}
    assert {orjson.loads(a)["order"]: orjson.loads(a)["skus"] for a in aggregates} == {
        "a": ["a1", "a2", "a3"],
        "b": ["b1", "b2", "b3"],
        "c": ["c1"],
    }


async def test_aggregate_survives_a_restart_with_a_partial_group(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    routes = f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.lines"
to = ["out{unique}.orders"]
stages = [{{ aggregate = {{ by = "order", count = 3 }} }}]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    async with Bus(config):
        await publish_all(nc, f"in{unique}.lines", [{"order": "x", "n": 1}, {"order": "x", "n": 2}])
        js = nc.jetstream()
        durable = f"busway-route-r{unique}"

        async def held() -> bool:
            info = await js.consumer_info(f"IN_{unique}", durable)
            return info.num_pending == 0 and info.num_ack_pending == 2

        from tests.support import eventually

        await eventually(held)
    # Stopped with a partial group: nothing published, both inputs handed back un-acked.
    assert (await js.stream_info(f"OUT_{unique}")).state.messages == 0

    async with Bus(config):
        await publish_all(nc, f"in{unique}.lines", [{"order": "x", "n": 3}])
        await wait_settled(nc, f"IN_{unique}", durable)

    [aggregate] = await outputs_of(nc, unique)
    body = orjson.loads(aggregate.data)
    assert body["key"] == "x"
    assert sorted(m["n"] for m in body["messages"]) == [1, 2, 3]


def aggregate_route(unique: str) -> str:
    return f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.lines"
to = ["out{unique}.orders"]
ack_wait = "2s"
stages = [{{ aggregate = {{ by = "order", count = 3, into = "{{order: key, n: messages[].n}}" }} }}]
"""


async def held_by_a_dead_process(nc: NatsClient, unique: str, count: int) -> None:
    """Take `count` inputs on the route's consumer and never ack them, as a killed daemon."""
    js = nc.jetstream()
    await ensure_consumer(
        js,
        stream=f"IN_{unique}",
        durable=f"busway-route-r{unique}",
        filter_subject=f"in{unique}.lines",
        ack_wait=2.0,
        max_ack_pending=1024,
    )
    subscription = await js.pull_subscribe_bind(f"busway-route-r{unique}", f"IN_{unique}")
    assert len(await subscription.fetch(count, timeout=5)) == count
    await subscription.unsubscribe()


async def test_aggregate_after_a_crash_re_forms_the_groups_the_inputs_were_in(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    # Lines 1 and 2 were held in a group by a daemon that was killed; 3 to 6 came after. The
    # new lines reach the restarted daemon at once, 1 and 2 only after ack_wait: grouped in
    # arrival order they would give [3, 4, 5] and [6, 1, 2].
    config = decode_test_config(config_text(nats_server, unique, aggregate_route(unique)), tmp_path)
    js = nc.jetstream()
    await js.add_stream(name=f"IN_{unique}", subjects=[f"in{unique}.>"])
    await publish_all(nc, f"in{unique}.lines", [{"order": "x", "n": n} for n in (1, 2)])
    await held_by_a_dead_process(nc, unique, 2)
    await publish_all(nc, f"in{unique}.lines", [{"order": "x", "n": n} for n in (3, 4, 5, 6)])
    async with Bus(config):
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
    groups = sorted(orjson.loads(m.data)["n"] for m in await outputs_of(nc, unique))
    assert groups == [[1, 2, 3], [4, 5, 6]]


async def test_inputs_of_a_group_published_before_a_crash_are_acked_not_grouped_again(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    # The daemon stored the aggregate of lines 1-3 and its record, then died before the acks
    # of lines 2 and 3 left it: they come back, and must not start a second group.
    config = decode_test_config(config_text(nats_server, unique, aggregate_route(unique)), tmp_path)
    js = nc.jetstream()
    await js.add_stream(name=f"IN_{unique}", subjects=[f"in{unique}.>"])
    await publish_all(nc, f"in{unique}.lines", [{"order": "x", "n": n} for n in (1, 2, 3)])
    await held_by_a_dead_process(nc, unique, 3)
    bucket = await state_bucket(js, config.state_bucket)
    record = f"aggregate.r{unique}.done.x.1"
    await bucket.put(record, orjson.dumps({"key": "x", "members": [1, 2, 3]}))
    subscription = await js.pull_subscribe_bind(f"busway-route-r{unique}", f"IN_{unique}")
    [first] = await subscription.fetch(1, timeout=10)  # line 1 is redelivered ...
    await first.ack_sync()  # ... and its ack arrives this time
    await subscription.unsubscribe()
    async with Bus(config) as bus:
        await publish_all(nc, f"in{unique}.lines", [{"order": "x", "n": n} for n in (4, 5, 6)])
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        assert bus.metrics.stats[0].events["aggregate_inputs_acked_again"] == 2

        async def record_cleared() -> bool:
            try:
                await bucket.get(record)
            except nats.js.errors.KeyNotFoundError:
                return True
            return False

        await eventually(record_cleared)  # the ack floor passed lines 1-3
    assert [orjson.loads(m.data)["n"] for m in await outputs_of(nc, unique)] == [[4, 5, 6]]
