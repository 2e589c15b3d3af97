"""The HTTP sink's partner is down for 30 s (connection refused), then back.

A real receiver (uvicorn + Starlette on loopback) takes the first messages, stops, and starts
again on the same port `BUSWAY_FAULT_HTTP_DOWN` seconds later (30 by default, as the issue
says); messages keep arriving meanwhile. While it is down the sink retries with back-off, its
circuit opens and readiness goes false; once it is back, everything is delivered and the
receiver, deduplicating on `Idempotency-Key`, handled every message exactly once. Nothing is
dead-lettered. A second sink with `max_in_flight = 1` (the ordered configuration: JetStream
keeps a naked message pending, so nothing after it is delivered first) feeds a second
receiver, which must see every message in stream order.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures
from tests.http_support import Receiver, serving
from tests.support import NatsServer, decode_test_config, free_port, stream_messages, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.slow]

DOWN_SECONDS = float(os.environ.get("BUSWAY_FAULT_HTTP_DOWN", "30"))
BEFORE, DURING, AFTER = 1_000, 2_000, 1_000


async def publish(nc: NatsClient, subject: str, numbers: range) -> None:
    js = nc.jetstream(publish_async_max_pending=500)
    for n in numbers:
        await js.publish_async(
            subject, orjson.dumps({"n": n}), headers={"Nats-Msg-Id": f"order-{n}"}
        )
    await js.publish_async_completed()


async def test_http_partner_down_then_back_gets_everything_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    port, ordered_port = free_port(), free_port()
    receiver = Receiver()  # one record across both lives of the server
    ordered = Receiver()
    subject = f"hout{unique}.orders"
    config = decode_test_config(
        config_toml(nats_server, streams=[stream_table(f"HOUT_{unique}", f"hout{unique}.>")])
        + f"""
[[sinks]]
name = "partner{unique}"
type = "http"
from = "{subject}"
url = "http://127.0.0.1:{port}/orders"
timeout = {{ connect = "1s", read = "5s", total = "10s" }}
retry = {{ max_attempts = 10000, backoff = "100ms", max_backoff = "2s" }}
circuit = {{ failures = 5, cool_down = "2s" }}

[[sinks]]
name = "ordered{unique}"
type = "http"
from = "{subject}"
url = "http://127.0.0.1:{ordered_port}/orders"
max_in_flight = 1
timeout = {{ connect = "1s", read = "5s", total = "10s" }}
retry = {{ max_attempts = 10000, backoff = "100ms", max_backoff = "2s" }}
circuit = {{ failures = 5, cool_down = "2s" }}
""",
        tmp_path,
    )
    total = BEFORE + DURING + AFTER
    durable = f"busway-sink-partner{unique}"
    circuit_states: set[int] = set()
    ready_while_down: set[bool] = set()
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]
        async with serving(receiver.app(), port), serving(ordered.app(), ordered_port):
            await publish(nc, subject, range(BEFORE))
            await wait_settled(nc, f"HOUT_{unique}", durable)
            await wait_settled(nc, f"HOUT_{unique}", f"busway-sink-ordered{unique}")
        served_before = len(receiver.handled)
        down_since = time.monotonic()
        await publish(nc, subject, range(BEFORE, BEFORE + DURING))
        while time.monotonic() - down_since < DOWN_SECONDS:
            circuit_states.add(stats.circuit)
            ready_while_down.add(bus.readiness()[f"sink:partner{unique}"])
            await anyio.sleep(0.1)
        down_for = time.monotonic() - down_since
        async with serving(receiver.app(), port), serving(ordered.app(), ordered_port):
            await publish(nc, subject, range(BEFORE + DURING, total))
            await wait_settled(nc, f"HOUT_{unique}", durable, timeout=120)
            await wait_settled(nc, f"HOUT_{unique}", f"busway-sink-ordered{unique}", timeout=180)
        final_circuit = stats.circuit
        retried, dead_lettered, errors = stats.retried, stats.dead_lettered, dict(stats.errors)

    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.partner{unique}"
    ]
    keys = [f"order-{n}" for n in range(total)]
    arrived = [key for key, count in receiver.handled.items() for _ in range(count)]
    Figures.of(
        "http-sink-down",
        keys,
        arrived,
        down_s=round(down_for, 1),
        requests=len(receiver.seen),
        retried=retried,
        errors=errors,
        circuit_states_while_down=sorted(circuit_states),
        dead_lettered=dead_lettered,
    ).report()

    first_arrivals = list(dict.fromkeys(s.headers["idempotency-key"] for s in ordered.seen))
    assert first_arrivals == keys  # the ordered sink: stream order, outage or not
    assert ordered.handled == dict.fromkeys(keys, 1)
    assert served_before == BEFORE
    assert receiver.handled == dict.fromkeys(keys, 1)  # everything, nothing twice
    assert dead_lettered == 0 and dead == []
    assert 1 in circuit_states  # the circuit opened while the partner was down...
    assert final_circuit == 0  # ...and closed again once it was back
    assert False in ready_while_down  # /readyz told the operator


SHORT_DOWN_SECONDS = float(os.environ.get("BUSWAY_FAULT_HTTP_SHORT_DOWN", "6"))


async def test_an_outage_longer_than_the_retry_budget_dead_letters_nothing(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """`max_attempts = 4` with 200 ms back-off gives up within a second of real failures; the
    partner is down for 6 s. The circuit opens after 2 failed deliveries and from then on the
    held messages wait without burning attempts (probes included): on recovery every message
    is delivered once, and nothing was dead-lettered."""
    port = free_port()
    receiver = Receiver()
    subject = f"hshort{unique}.orders"
    config = decode_test_config(
        config_toml(nats_server, streams=[stream_table(f"HSHORT_{unique}", f"hshort{unique}.>")])
        + f"""
[[sinks]]
name = "partner{unique}"
type = "http"
from = "{subject}"
url = "http://127.0.0.1:{port}/orders"
timeout = {{ connect = "1s", read = "2s", total = "3s" }}
retry = {{ max_attempts = 4, backoff = "50ms", max_backoff = "200ms" }}
circuit = {{ failures = 2, cool_down = "200ms" }}
""",
        tmp_path,
    )
    total = 20
    circuit_states: set[int] = set()
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]
        down_since = time.monotonic()
        await publish(nc, subject, range(total // 2))
        published_more = False
        while time.monotonic() - down_since < SHORT_DOWN_SECONDS:
            circuit_states.add(stats.circuit)
            if not published_more and time.monotonic() - down_since > SHORT_DOWN_SECONDS / 2:
                await publish(nc, subject, range(total // 2, total))  # more arrive meanwhile
                published_more = True
            await anyio.sleep(0.05)
        async with serving(receiver.app(), port):
            await wait_settled(nc, f"HSHORT_{unique}", f"busway-sink-partner{unique}", timeout=60)
        dead_lettered, retried = stats.dead_lettered, stats.retried

    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.partner{unique}"
    ]
    keys = [f"order-{n}" for n in range(total)]
    Figures.of(
        "http-sink-down-past-max-attempts",
        keys,
        [key for key, count in receiver.handled.items() for _ in range(count)],
        down_s=SHORT_DOWN_SECONDS,
        retried=retried,
        dead_lettered=dead_lettered,
    ).report()

    assert 1 in circuit_states  # the circuit opened
    assert receiver.handled == dict.fromkeys(keys, 1)  # everything, once
    assert dead_lettered == 0 and dead == []
    assert retried <= total  # at most one counted attempt each before the circuit opened
