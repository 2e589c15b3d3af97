"""20 SIGKILLs of the daemon while 20,000 messages go HTTP -> JetStream -> route -> file.

The daemon (`busway run`) reads from an external nats-server the test owns (fsync before every
PubAck), so the kills hit busway alone. The client sends each message with an
`Idempotency-Key` and retries on connection errors and 503 until it gets its 202, as a careful
client does; the daemon is killed at 20 random points of the flow and restarted each time.
Afterwards every message must be in the input stream once, in the output stream once and in
the file once.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled, message_id, read_stream
from tests.support import Daemon, NatsServer, eventually, free_port

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

TOTAL = int(os.environ.get("BUSWAY_FAULT_MESSAGES", "20000"))
KILLS = 20
CONCURRENCY = 16


def daemon_config(nats_url: str, http_port: int) -> str:
    return (
        config_toml(
            nats_url,
            top='shutdown_timeout = "5s"',
            http=f"127.0.0.1:{http_port}",
            streams=[stream_table("KILL_IN", "killin.>"), stream_table("KILL_OUT", "killout.>")],
        )
        + """
[[sources]]
name = "ingest"
type = "http"
path = "/orders"
subject = "killin.orders"

[[routes]]
name = "forward"
from = "killin.orders"
transform = "{id: id, total: total}"
to = ["killout.orders"]
ack_wait = "2s"

[[sinks]]
name = "file"
type = "file"
from = "killout.orders"
path = "out/orders.jsonl"
ack_wait = "2s"
"""
    )


class Client:
    """Sends messages 0..TOTAL-1 with `Idempotency-Key`, retrying each until its 202."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted = 0
        self.attempts = 0
        self._next = 0

    async def run(self) -> None:
        limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
        async with (
            httpx.AsyncClient(limits=limits, timeout=10) as http,
            anyio.create_task_group() as tg,
        ):
            for _ in range(CONCURRENCY):
                tg.start_soon(self._worker, http)

    async def _worker(self, http: httpx.AsyncClient) -> None:
        while self._next < TOTAL:
            n = self._next
            self._next += 1
            await self._send(http, n)

    async def _send(self, http: httpx.AsyncClient, n: int) -> None:
        body = orjson.dumps({"id": n, "total": n % 1000})
        headers = {"Idempotency-Key": f"order-{n}", "content-type": "application/json"}
        while True:
            self.attempts += 1
            try:
                response = await http.post(self.url, content=body, headers=headers)
            except httpx.TransportError:
                await anyio.sleep(0.05)  # the daemon is down or restarting
                continue
            if response.status_code == 202:
                self.accepted += 1
                return
            assert response.status_code == 503, (response.status_code, response.text)
            await anyio.sleep(0.05)


async def test_twenty_sigkills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store, sync_always=True)
    http_port = free_port()
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url, http_port))
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    seed = int(os.environ.get("BUSWAY_FAULT_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    # Kill points, as counts of accepted messages, spread over the whole run.
    thresholds = sorted(rng.sample(range(TOTAL // 40, TOTAL - TOTAL // 40), KILLS))
    client = Client(f"http://127.0.0.1:{http_port}/orders")
    kills: list[int] = []
    written: list[int] = []  # lines in the file at each kill: the sink was mid-flow too
    out = tmp_path / "out" / "orders.jsonl"

    async def killer() -> None:
        for threshold in thresholds:

            async def reached(threshold: int = threshold) -> bool:
                return client.accepted >= threshold

            await eventually(reached, timeout=240)
            await anyio.sleep(rng.uniform(0, 0.3))  # somewhere in the flow, not on a boundary
            daemon.kill()
            kills.append(client.accepted)
            written.append(out.read_bytes().count(b"\n") if out.exists() else 0)
            daemon.start()
            await daemon.ready()

    try:
        daemon.start()
        await daemon.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(killer)
            tg.start_soon(client.run)

        async def drained() -> bool:
            return await consumer_settled(
                server.url, "KILL_IN", "busway-route-forward"
            ) and await consumer_settled(server.url, "KILL_OUT", "busway-sink-file")

        await eventually(drained, timeout=180)
        assert await daemon.stop() == 0

        inputs = await read_stream(server.url, "KILL_IN")
        outputs = await read_stream(server.url, "KILL_OUT")
    finally:
        daemon.kill()
        server.stop()
    lines = out.read_bytes().splitlines()
    sent = range(TOTAL)
    in_stream = Figures.of(
        "sigkill:input-stream", sent, [orjson.loads(m.data)["id"] for m in inputs]
    )
    out_stream = Figures.of(
        "sigkill:output-stream", sent, [orjson.loads(m.data)["id"] for m in outputs]
    )
    in_file = Figures.of(
        "sigkill:file",
        sent,
        [orjson.loads(line)["id"] for line in lines],
        kills=len(kills),
        restarts=daemon.starts - 1,
        http_attempts=client.attempts,
        seed=seed,
    )
    for figures in (in_stream, out_stream, in_file):
        figures.report()
    print(f"[fault:sigkill] killed at accepted counts {kills}")
    print(f"[fault:sigkill] lines in the file at each kill {written}")

    assert len(kills) == KILLS
    for figures in (in_stream, out_stream, in_file):
        assert (figures.sent, figures.delivered, figures.lost, figures.duplicated) == (
            TOTAL,
            TOTAL,
            0,
            0,
        ), figures
    assert sorted(message_id(m) for m in inputs) == sorted(f"ingest:anon:order-{n}" for n in sent)
    assert {orjson.loads(line)["total"] for line in lines} <= set(range(1000))
