"""The `file` sink on real files: on disk before the ack; failures retried or dead-lettered."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.support import (
    NatsServer,
    decode_test_config,
    eventually,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def sink_config(server: NatsServer, unique: str, path: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]

[[sinks]]
name = "file{unique}"
type = "file"
from = "out{unique}.>"
path = "{path}"
retry = {{ max_attempts = 50, backoff = "50ms", max_backoff = "100ms" }}
"""


async def test_messages_are_appended_as_json_lines(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(sink_config(nats_server, unique, "out/orders.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        for i in range(300):
            await js.publish(f"out{unique}.x", orjson.dumps({"n": i}))
        # A pretty-printed body is still one line in the file.
        await js.publish(f"out{unique}.x", b'{\n  "n": 300\n}')

        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.metrics.stats[0].published == 301
    lines = (tmp_path / "out" / "orders.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["n"] for line in lines] == list(range(301))


async def test_non_json_body_is_dead_lettered_and_the_rest_written(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(sink_config(nats_server, unique, "out.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(f"out{unique}.x", b'{"n": 1}')
        await js.publish(f"out{unique}.x", b"plain text")
        await js.publish(f"out{unique}.x", b'{"n": 2}')

        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.metrics.stats[0].dead_lettered == 1
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"n": 1}\n{"n": 2}\n'
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.file{unique}"
    ]
    assert [m.data for m in dead] == [b"plain text"]
    assert dead[0].headers and "is not JSON" in dead[0].headers["Busway-Error"]


async def test_unwritable_path_is_retried_until_it_works_and_readiness_shows_it(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file where the sink wants a directory")
    config = decode_test_config(sink_config(nats_server, unique, "out/orders.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(f"out{unique}.x", b'{"n": 1}')
        stats = bus.metrics.stats[0]

        async def failing() -> bool:
            return stats.retried >= 2

        await eventually(failing)
        assert bus.readiness()[f"sink:file{unique}"] is False
        assert stats.errors["retryable"] >= 2
        blocker.unlink()

        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.readiness()[f"sink:file{unique}"] is True
        assert stats.dead_lettered == 0
    assert (tmp_path / "out" / "orders.jsonl").read_bytes() == b'{"n": 1}\n'
