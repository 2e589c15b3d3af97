"""A nats-server restart mid-flow: busway reconnects, re-issues its pulls, and loses nothing."""

from __future__ import annotations

from pathlib import Path

import nats
import orjson
import pytest

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled

pytestmark = pytest.mark.anyio


async def publish(url: str, subject: str, numbers: range) -> None:
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        for n in numbers:
            await js.publish(subject, orjson.dumps({"n": n}))
    finally:
        await client.close()


async def test_route_resumes_after_the_server_restarts(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store)
    try:
        config = decode_test_config(
            config_toml(
                server, streams=[stream_table("RIN", "rin.>"), stream_table("ROUT", "rout.>")]
            )
            + """
[[routes]]
name = "restart"
from = "rin.x"
to = ["rout.x"]
""",
            tmp_path,
        )
        async with Bus(config) as bus:
            await publish(server.url, "rin.x", range(100))
            client = await nats.connect(server.url)
            await wait_settled(client, "RIN", "busway-route-restart")
            await client.close()

            server.stop()
            server = NatsServer(store, port=server.port)  # same store, same port
            await publish(server.url, "rin.x", range(100, 200))
            client = await nats.connect(server.url)
            await wait_settled(client, "RIN", "busway-route-restart", timeout=60)
            assert bus.readiness()["nats"] is True
            outputs = await stream_messages(client, "ROUT")
            await client.close()
        assert [orjson.loads(m.data)["n"] for m in outputs] == list(range(200))
    finally:
        server.stop()
