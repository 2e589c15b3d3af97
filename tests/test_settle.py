"""Every exit of the per-message path settles the message exactly once and frees its slot.

Each test drives some of the exits through a real nats-server and records every call of
`ConsumerComponent.settle` (a spy that passes each call on). At the end every delivery the
component took was settled exactly once, nothing is in flight, and no second settle was seen:

ack, filtered, reject → dead letter, transient → nak, unexpected exception on the synchronous
and the asynchronous path, publish failure, dead-letter publish failure, drain nak, and
max_attempts (on arrival and at the last attempt); and for a sink: delivered, refused, an
unclassified error from the adapter, and a bug while settling a batch.

Where a test needs busway's own code to fail in a way no real input can make it fail today
(the "unexpected exception" exits), it swaps the route's `process` for one that raises on a
marked body: fault injection into busway, never a fake server.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, StreamConfig

from busway import (
    Adapter,
    AdapterRegistry,
    BatchError,
    BuildContext,
    Bus,
    Message,
    PermanentError,
    Sink,
    SinkConfig,
    decode_config,
)
from busway._delivery.consumer import ConsumerComponent
from busway._delivery.contract import ACK, DRAIN_NAK, TERM
from busway._egress.worker import SinkWorker
from busway.routers.route import Route
from tests.configs import config_toml, io_streams, stream_table
from tests.support import NatsServer, decode_test_config, eventually, stream_messages, wait_settled

pytestmark = pytest.mark.anyio

_attempts: collections.Counter[int] = collections.Counter()
_release_held = anyio.Event()


def fails_first_attempt(body: dict[str, Any]) -> dict[str, Any]:
    """A stage that fails the first time it sees a message (a transient error)."""
    _attempts[body["id"]] += 1
    if _attempts[body["id"]] == 1:
        raise ConnectionError(f"partner busy for {body['id']}")
    return body


def always_fails(body: dict[str, Any]) -> dict[str, Any]:
    """A stage that fails every time (a poison message for `max_attempts`)."""
    raise ConnectionError(f"cannot handle {body['id']}")


async def holds_marked(body: dict[str, Any]) -> dict[str, Any]:
    """An async stage that holds a body marked `hold` until the test releases it."""
    if body.get("hold"):
        await _release_held.wait()
    return body


Settles = list[tuple[str, str, bytes]]


@pytest.fixture
def settles(monkeypatch: pytest.MonkeyPatch) -> Settles:
    """Every settle call as (component, reply, payload), in order."""
    calls: Settles = []
    original = ConsumerComponent.settle

    async def spy(self: ConsumerComponent, message: Any, payload: bytes) -> None:
        calls.append((self.stats.name, message.reply, payload))
        await original(self, message, payload)

    monkeypatch.setattr(ConsumerComponent, "settle", spy)
    return calls


def explode_on_marker(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `Route.process` / `process_async` raise a RuntimeError on bodies with `explode`."""
    process, process_async = Route.process, Route.process_async

    def exploding(self: Route, data: bytes, context: Any = None) -> Any:
        if b'"explode"' in data:
            raise RuntimeError("injected fault in the route")
        return process(self, data, context)

    async def exploding_async(self: Route, data: bytes, context: Any, services: Any) -> Any:
        if b'"explode"' in data:
            raise RuntimeError("injected fault in the async route")
        return await process_async(self, data, context, services)

    monkeypatch.setattr(Route, "process", exploding)
    monkeypatch.setattr(Route, "process_async", exploding_async)


def assert_each_settled_once(bus: Bus, calls: Settles) -> None:
    """Every delivery taken by every route and sink was settled exactly once."""
    for stats in bus.metrics.stats:
        if stats.kind == "source":
            continue
        replies = [reply for name, reply, _ in calls if name == stats.name]
        assert len(replies) == len(set(replies)), f"{stats.name}: a delivery settled twice"
        assert len(replies) == stats.received, f"{stats.name}: a delivery never settled"
        assert stats.in_flight == 0
        assert "settled_twice" not in stats.errors


def payloads(calls: Settles, name: str) -> collections.Counter[str]:
    """How `name` settled: counts of ack / nak / drain / term."""
    kinds: collections.Counter[str] = collections.Counter()
    for component, _, payload in calls:
        if component != name:
            continue
        if payload == ACK:
            kinds["ack"] += 1
        elif payload == TERM:
            kinds["term"] += 1
        elif payload == DRAIN_NAK:
            kinds["drain"] += 1
        else:
            assert payload.startswith(b"-NAK"), payload
            kinds["nak"] += 1
    return kinds


async def dead_letters(nc: NatsClient, subject: str) -> list[Any]:
    return [m for m in await stream_messages(nc, "BUSWAY_DEADLETTER") if m.subject == subject]


def base_config(server: NatsServer, unique: str) -> str:
    return config_toml(server, publish_timeout="2s", streams=io_streams(unique))


async def test_sync_route_exits_ack_filter_reject_retry_and_unexpected(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    settles: Settles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    explode_on_marker(monkeypatch)
    config = decode_test_config(
        base_config(nats_server, unique)
        + f"""
[[routes]]
name = "sync{unique}"
from = "in{unique}.sync"
to = ["out{unique}.sync"]
max_in_flight = 4
when = "kind != 'skip'"
retry = {{ max_attempts = 3, backoff = "20ms", max_backoff = "50ms" }}
""",
        tmp_path,
    )
    js = nc.jetstream()
    async with Bus(config) as bus:
        for body in (
            b'{"id": 1}',  # ack
            b'{"id": 2, "kind": "skip"}',  # filtered
            b"not json",  # reject: dead-lettered at once
            b'{"id": 4, "explode": true}',  # unexpected exception: dead-lettered, real text
            b'{"id": 5}',
        ):
            await js.publish(f"in{unique}.sync", body)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-sync{unique}")
        assert_each_settled_once(bus, settles)
        stats = bus.metrics.stats[0]
        assert (stats.filtered, stats.dead_lettered, stats.published) == (1, 2, 2)
        assert payloads(settles, f"sync{unique}") == {"ack": 3, "term": 2}

    dead = await dead_letters(nc, f"busway.deadletter.sync{unique}")
    reasons = sorted((m.headers or {})["Busway-Error-Reason"] for m in dead)
    assert reasons == ["decode", "unexpected"]
    [exploded] = [m for m in dead if (m.headers or {})["Busway-Error-Reason"] == "unexpected"]
    assert (exploded.headers or {})["Busway-Error"] == "RuntimeError: injected fault in the route"
    assert exploded.data == b'{"id": 4, "explode": true}'


async def test_async_route_exits_retry_unexpected_and_max_attempts(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    settles: Settles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    explode_on_marker(monkeypatch)
    config = decode_test_config(
        base_config(nats_server, unique)
        + f"""
[[routes]]
name = "flaky{unique}"
from = "in{unique}.flaky"
to = ["out{unique}.flaky"]
max_in_flight = 4
retry = {{ max_attempts = 2, backoff = "20ms", max_backoff = "50ms" }}
stages = [
  {{ python = "tests.test_settle:holds_marked" }},
  {{ python = "tests.test_settle:fails_first_attempt" }},
]

[[routes]]
name = "poison{unique}"
from = "in{unique}.poison"
to = ["out{unique}.poison"]
retry = {{ max_attempts = 2, backoff = "20ms", max_backoff = "50ms" }}
stages = [{{ python = "tests.test_settle:always_fails" }}]
""",
        tmp_path,
    )
    js = nc.jetstream()
    base = int(unique, 16) * 10  # ids no other test run shares (the counter is global)
    async with Bus(config) as bus:
        await js.publish(f"in{unique}.flaky", orjson.dumps({"id": base + 1}))  # nak, then ack
        await js.publish(f"in{unique}.flaky", orjson.dumps({"id": base + 2, "explode": True}))
        await js.publish(f"in{unique}.poison", orjson.dumps({"id": base + 3}))  # max_attempts
        await wait_settled(nc, f"IN_{unique}", f"busway-route-flaky{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-poison{unique}")
        assert_each_settled_once(bus, settles)
        assert payloads(settles, f"flaky{unique}") == {"nak": 1, "ack": 1, "term": 1}
        assert payloads(settles, f"poison{unique}") == {"nak": 1, "term": 1}

    dead = await dead_letters(nc, f"busway.deadletter.flaky{unique}")
    assert [(m.headers or {})["Busway-Error"] for m in dead] == [
        "RuntimeError: injected fault in the async route"
    ]
    [poisoned] = await dead_letters(nc, f"busway.deadletter.poison{unique}")
    assert poisoned.headers is not None
    assert poisoned.headers["Busway-Error-Reason"] == "max_attempts"
    assert "ConnectionError: cannot handle" in poisoned.headers["Busway-Error"]


async def test_publish_and_dead_letter_publish_failures_nak_until_there_is_room(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path, settles: Settles
) -> None:
    js = nc.jetstream()
    # Streams managed outside busway that refuse writes when full (discard new).
    await js.add_stream(
        StreamConfig(
            name=f"FULL_{unique}",
            subjects=[f"full{unique}.>"],
            max_msgs=1,
            discard=DiscardPolicy.NEW,
        )
    )
    await js.add_stream(
        StreamConfig(
            name=f"DLQ_{unique}",
            subjects=[f"dlq{unique}.>"],
            max_msgs=1,
            discard=DiscardPolicy.NEW,
        )
    )
    await js.publish(f"full{unique}.filler", b"{}")
    await js.publish(f"dlq{unique}.filler", b"{}")
    config = decode_test_config(
        base_config(nats_server, unique)
        + f"""
[[streams]]
name = "FULL_{unique}"
subjects = ["full{unique}.>"]
create = false

[[streams]]
name = "DLQ_{unique}"
subjects = ["dlq{unique}.>"]
create = false

[[routes]]
name = "pub{unique}"
from = "in{unique}.pub"
to = ["full{unique}.out"]
retry = {{ max_attempts = 1000, backoff = "50ms", max_backoff = "100ms" }}

[[routes]]
name = "dlq{unique}"
from = "in{unique}.dlq"
to = ["out{unique}.dlq"]
when = "kind != 'skip'"
dead_letter = "dlq{unique}.dead"
retry = {{ backoff = "50ms", max_backoff = "100ms" }}
""",
        tmp_path,
    )
    async with Bus(config) as bus:
        await js.publish(f"in{unique}.pub", b'{"id": 1}')
        await js.publish(f"in{unique}.dlq", b"not json")

        async def both_refused() -> bool:
            errors = {stats.name: stats.errors for stats in bus.metrics.stats}
            return (
                errors[f"pub{unique}"].get("publish", 0) >= 2
                and errors[f"dlq{unique}"].get("dead_letter_publish", 0) >= 2
            )

        await eventually(both_refused)
        reasons = bus.readiness_reasons()
        assert reasons["jetstream"] is not None
        assert "maximum messages exceeded" in reasons["jetstream"]
        # Room again: both go through, and readiness recovers.
        await js.purge_stream(f"FULL_{unique}")
        await js.purge_stream(f"DLQ_{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-pub{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-dlq{unique}")
        assert_each_settled_once(bus, settles)
        assert payloads(settles, f"pub{unique}")["ack"] == 1
        assert payloads(settles, f"dlq{unique}")["term"] == 1
        assert bus.readiness_reasons()["jetstream"] is None

    assert [m.data for m in await stream_messages(nc, f"FULL_{unique}")] == [b'{"id": 1}']
    [dead] = await stream_messages(nc, f"DLQ_{unique}")
    assert dead.data == b"not json"


async def test_a_redelivery_that_crashed_nothing_is_processed_alone_and_drain_naks(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path, settles: Settles
) -> None:
    js = nc.jetstream()
    durable = f"busway-route-arr{unique}"
    await js.add_stream(StreamConfig(name=f"IN_{unique}", subjects=[f"in{unique}.>"]))
    await js.publish(f"in{unique}.arr", b'{"id": "worn"}')
    # Deliver it twice without acking (as a daemon that died beside it would): its delivery
    # count is past max_attempts before busway ever handles it. No ledger entry blames it
    # (it was never processed alone when a process died), so it counts no real attempt:
    # it is processed, alone, and acked (see busway._delivery.isolation).
    await js.add_consumer(
        f"IN_{unique}",
        ConsumerConfig(
            durable_name=durable,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=0.5,
            filter_subject=f"in{unique}.arr",
        ),
    )
    puller = await js.pull_subscribe_bind(durable, f"IN_{unique}")
    for _ in range(2):
        with anyio.fail_after(10):
            while not await puller.fetch(1, timeout=2):
                pass
    await puller.unsubscribe()

    config = decode_test_config(
        base_config(nats_server, unique)
        + f"""
[[routes]]
name = "arr{unique}"
from = "in{unique}.arr"
to = ["out{unique}.arr"]
ack_wait = "1s"
retry = {{ max_attempts = 2 }}

[[routes]]
name = "held{unique}"
from = "in{unique}.held"
to = ["out{unique}.held"]
max_in_flight = 4
stages = [{{ python = "tests.test_settle:holds_marked" }}]
""",
        tmp_path,
    )
    async with anyio.create_task_group() as tg:
        bus = Bus(config)
        stopped = anyio.Event()

        async def run_bus() -> None:
            async with bus:
                await bus.wait_until_stopped()
            stopped.set()

        tg.start_soon(run_bus)
        await eventually(lambda: _true(bus.app is not None))
        await wait_settled(nc, f"IN_{unique}", durable)
        # A held message keeps the drain waiting; what arrives meanwhile is naked at once.
        await js.publish(f"in{unique}.held", b'{"id": "h", "hold": true}')
        held_route = f"held{unique}"
        await eventually(lambda: _true(_stats(bus, held_route).in_flight == 1))
        bus.stop()

        async def drain_nak_seen() -> bool:
            await js.publish(f"in{unique}.held", b'{"id": "late"}')
            return payloads(settles, held_route)["drain"] > 0

        await eventually(drain_nak_seen)
        _release_held.set()
        await stopped.wait()

    assert_each_settled_once(bus, settles)
    kinds = payloads(settles, held_route)
    # The held one (acked once released) and the late ones taken before the drain began are
    # acked; those that arrived during the drain were handed back at once.
    assert kinds["ack"] >= 1 and kinds["drain"] >= 1 and set(kinds) == {"ack", "drain"}
    assert payloads(settles, f"arr{unique}") == {"ack": 1}
    assert await dead_letters(nc, f"busway.deadletter.arr{unique}") == []


async def _true(value: bool) -> bool:
    return value


def _stats(bus: Bus, name: str) -> Any:
    return next(s for s in bus.metrics.stats if s.name == name)


class ListSinkConfig(SinkConfig, tag="settle-list", frozen=True, kw_only=True):
    """A sink kept in memory: it refuses `bad`, and raises an unclassified error on `raise`."""


class ListSink(Sink):
    """Delivers into a list; `bad` is refused for good, `raise` makes the whole write raise."""

    def __init__(self, config: ListSinkConfig, context: BuildContext) -> None:
        self.delivered: list[str] = []

    async def write(self, batch: Sequence[Message]) -> None:
        names = [orjson.loads(message.data)["name"] for message in batch]
        if "raise" in names:
            raise ValueError("the driver broke")  # not a busway error: unclassified
        failures = {i: PermanentError("refused") for i, name in enumerate(names) if name == "bad"}
        self.delivered += [name for name in names if name != "bad"]
        if failures:
            raise BatchError(failures)


async def test_sink_exits_and_a_bug_while_settling_a_batch(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    settles: Settles,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settle_delivered = SinkWorker._settle_delivered

    async def buggy(self: SinkWorker, entry: Any, *args: Any) -> bool:
        if b'"bug"' in entry[0].data and entry[1].attempt == 1:
            raise RuntimeError("injected fault while settling")
        return await settle_delivered(self, entry, *args)

    monkeypatch.setattr(SinkWorker, "_settle_delivered", buggy)
    registry = AdapterRegistry(
        [Adapter(type="settle-list", sink_config=ListSinkConfig, create_sink=ListSink)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(f"SK_{unique}", f"sk{unique}.>")])
        + f"""
[[sinks]]
name = "list{unique}"
type = "settle-list"
from = "sk{unique}.>"
batch_size = 1
retry = {{ max_attempts = 2, backoff = "10ms", max_backoff = "20ms" }}
circuit = {{ failures = 0 }}
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, registry=registry)
    sink = bus.plan.sinks[0][1]
    assert isinstance(sink, ListSink)
    js = nc.jetstream()
    async with bus:
        for name in ("a", "bad", "raise", "bug", "b"):
            await js.publish(f"sk{unique}.x", orjson.dumps({"name": name}))
        await wait_settled(nc, f"SK_{unique}", f"busway-sink-list{unique}")
        assert_each_settled_once(bus, settles)
        # a, b acked; bad dead-lettered; raise naked once, then dead-lettered at max_attempts;
        # bug delivered, then settling it failed: naked (the peer may have it), delivered again.
        assert payloads(settles, f"list{unique}") == {"ack": 3, "term": 2, "nak": 2}

    assert sorted(sink.delivered) == ["a", "b", "bug", "bug"]  # at least once, never lost
    dead = {
        orjson.loads(m.data)["name"]: (m.headers or {})
        for m in await dead_letters(nc, f"busway.deadletter.list{unique}")
    }
    assert dead["bad"]["Busway-Error-Reason"] == "permanent"
    assert dead["raise"]["Busway-Error-Reason"] == "max_attempts"
    assert "the driver broke" in dead["raise"]["Busway-Error"]
    assert "bug" not in dead
