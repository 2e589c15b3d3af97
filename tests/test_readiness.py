"""`/readyz` tells the truth: 503 with the reason while a route is stalled or JetStream refuses
writes, 200 again once it recovers. Real HTTP against a running bus."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, StreamConfig

from busway import Bus
from busway._observe.status import format_status
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, eventually, readyz, wait_settled

pytestmark = pytest.mark.anyio

_release = anyio.Event()


async def waits_for_the_test(body: dict[str, Any]) -> dict[str, Any]:
    """A stage that holds every message until the test releases it."""
    await _release.wait()
    return body


async def test_a_route_stuck_at_capacity_longer_than_ack_wait_is_not_ready(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    global _release
    _release = anyio.Event()
    config = decode_test_config(
        config_toml(nats_server, streams=[stream_table(f"ST_{unique}", f"st{unique}.>")])
        + f"""
[[routes]]
name = "r{unique}"
from = "st{unique}.in"
to = ["st{unique}.out"]
max_in_flight = 2
ack_wait = "1s"
stages = [{{ python = {{ function = "tests.test_readiness:waits_for_the_test", timeout = "2m" }} }}]
""",
        tmp_path,
    )
    check = f"route:r{unique}"
    async with Bus(config) as bus:
        assert (await readyz(bus)).status_code == 200
        for n in range(3):
            await nc.jetstream().publish(f"st{unique}.in", orjson.dumps({"n": n}))

        async def stalled() -> bool:
            return (await readyz(bus)).status_code == 503

        await eventually(stalled)
        body = (await readyz(bus)).json()
        assert body["checks"][check] is False
        assert body["reasons"][check].startswith("stalled: all 2 in-flight slot(s) taken")
        assert "ack_wait 1s" in body["reasons"][check]
        assert (await bus.status()).not_ready == {check: body["reasons"][check]}

        _release.set()
        await wait_settled(nc, f"ST_{unique}", f"busway-route-r{unique}")

        async def ready_again() -> bool:
            return (await readyz(bus)).status_code == 200

        await eventually(ready_again)
        assert bus.metrics.stats[0].published == 3


async def test_jetstream_refusing_writes_makes_readyz_503_until_there_is_room(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=f"TINY_{unique}",
            subjects=[f"tiny{unique}.>"],
            max_bytes=256,
            discard=DiscardPolicy.NEW,
        )
    )
    config = decode_test_config(
        config_toml(
            nats_server,
            publish_timeout="2s",
            streams=[
                stream_table(f"IN_{unique}", f"in{unique}.>"),
                stream_table(f"TINY_{unique}", f"tiny{unique}.>", create=False),
            ],
        )
        + f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
to = ["tiny{unique}.orders"]
retry = {{ max_attempts = 1000, backoff = "50ms", max_backoff = "200ms" }}

[[sources]]
name = "api{unique}"
type = "http"
path = "/tiny"
subject = "tiny{unique}.direct"
""",
        tmp_path,
    )
    async with Bus(config) as bus:
        for n in range(10):  # ~100 bytes each: the stream takes two, then refuses
            await js.publish(f"in{unique}.orders", orjson.dumps({"n": n, "pad": "x" * 64}))

        async def refused() -> bool:
            return (await readyz(bus)).status_code == 503

        await eventually(refused)
        body = (await readyz(bus)).json()
        assert body["checks"]["jetstream"] is False
        reason = body["reasons"]["jetstream"]
        assert f"JetStream refuses writes to 'tiny{unique}.orders'" in reason
        assert "maximum bytes exceeded" in reason
        assert "free space or raise" in reason
        assert body["checks"][f"route:r{unique}"] is True  # the route itself is healthy

        # A source that hits the same wall answers 503 and readiness names it too.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            assert (await http.post("/tiny", json={"big": "y" * 300})).status_code == 503
        assert "(and 1 other subject(s))" in (await readyz(bus)).json()["reasons"]["jetstream"]

        await js.purge_stream(f"TINY_{unique}")
        await js.update_stream(
            StreamConfig(
                name=f"TINY_{unique}",
                subjects=[f"tiny{unique}.>"],
                max_bytes=1 << 20,
                discard=DiscardPolicy.NEW,
            )
        )
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            assert (await http.post("/tiny", json={"n": 1})).status_code == 202

        async def ready_again() -> bool:
            return (await readyz(bus)).status_code == 200

        await eventually(ready_again)


def test_busway_status_says_why_a_component_is_not_ready() -> None:
    report = {
        "status": "not ready",
        "nats": True,
        "not_ready": {"route:orders": "stalled: all 4 in-flight slot(s) taken"},
        "components": [
            {
                "name": "orders",
                "kind": "route",
                "ready": False,
                "rate_in": 0.0,
                "rate_out": 0.0,
                "dead_lettered": 0,
            }
        ],
    }
    table = format_status(report)
    assert table.startswith("busway: not ready (nats up)")
    assert "NOT READY" in table.splitlines()[2]
    assert "not ready: route:orders: stalled: all 4 in-flight slot(s) taken" in table
