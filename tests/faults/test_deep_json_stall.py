"""Bodies nested 300 deep among normal ones, into a route with `max_in_flight = 4`.

orjson reads such a body but refuses to write it back (255 levels at most), so the route's
re-serialisation fails. Before, that escaped the synchronous route path: the message was never
settled and its in-flight slot never freed, so a few such bodies stalled the route for good
while `/readyz` still answered 200. Now each one is dead-lettered at once with the real error,
every normal message is delivered exactly once, the slots all come back, and readiness is 200
because the route is in fact healthy.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, read_stream
from tests.support import NatsServer, decode_test_config, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

NORMAL, DEEP, DEPTH = 200, 6, 300


def deep_body(n: int) -> bytes:
    """`{"id": n, "deep": [[[...]]]}` with the array nested DEPTH levels."""
    return b'{"id":%d,"deep":%s0%s}' % (n, b"[" * DEPTH, b"]" * DEPTH)


async def test_deep_bodies_are_dead_lettered_and_never_stall_the_route(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        config_toml(nats_server, streams=[stream_table(f"DEEP_{unique}", f"deep{unique}.>")])
        + f"""
[[routes]]
name = "r{unique}"
from = "deep{unique}.in"
to = ["deep{unique}.out"]
max_in_flight = 4
ack_wait = "2s"
retry = {{ max_attempts = 3, backoff = "50ms", max_backoff = "100ms" }}
stages = [{{ set = {{ routed = "`true`" }} }}]
""",
        tmp_path,
    )
    deep_ids = set(range(NORMAL, NORMAL + DEEP))
    js = nc.jetstream()
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]
        for n in range(NORMAL + DEEP):
            # The deep bodies are spread among the normal ones.
            body = deep_body(n) if n in deep_ids else orjson.dumps({"id": n})
            await js.publish(f"deep{unique}.in", body)
        await wait_settled(nc, f"DEEP_{unique}", f"busway-route-r{unique}", timeout=60)
        in_flight = stats.in_flight
        errors = dict(stats.errors)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            ready = await http.get("/readyz")

    outputs = [
        orjson.loads(m.data)
        for m in await read_stream(nats_server.url, f"DEEP_{unique}")
        if m.subject == f"deep{unique}.out"
    ]
    dead = [
        m
        for m in await read_stream(nats_server.url, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.r{unique}"
    ]
    Figures.of(
        "deep-json-stall",
        range(NORMAL),
        [body["id"] for body in outputs],
        dead_lettered=len(dead),
        in_flight=in_flight,
    ).report()

    assert sorted(body["id"] for body in outputs) == list(range(NORMAL))  # each exactly once
    assert all(body["routed"] is True for body in outputs)
    assert sorted(orjson.loads(m.data)["id"] for m in dead) == sorted(deep_ids)
    for message in dead:
        headers = message.headers or {}
        assert headers["Busway-Error-Reason"] == "encode"
        assert "Recursion limit reached" in headers["Busway-Error"]
        assert headers["Busway-Attempts"] == "1"  # dead-lettered at once, not retried
        assert message.data == deep_body(orjson.loads(message.data)["id"])  # body untouched
    assert in_flight == 0
    assert "settled_twice" not in errors
    assert ready.status_code == 200
    assert ready.json()["checks"][f"route:r{unique}"] is True
