"""SIGKILL of the *embedded* nats-server, three times, while messages flow through `busway run`.

The daemon runs its own nats-server (fsync before every PubAck) and supervises it: a killed
server is restarted on the same port and store after a back-off, the connection comes back, the
route and the sink carry on. Meanwhile the client posts each message with an `Idempotency-Key`
and retries on 503 and connection errors, as a careful client does. `/healthz` must say 503
while the server is down and 200 once it is back; at the end each message is in the input
stream, the output stream and the file exactly once, and nothing was dead-lettered.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled, message_id, read_stream
from tests.support import Daemon, eventually, free_port

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

TOTAL = 4000
KILLS = 3
CONCURRENCY = 16


def daemon_config(nats_port: int, http_port: int) -> str:
    return (
        config_toml(
            None,
            top='shutdown_timeout = "5s"',
            nats_listen=f"127.0.0.1:{nats_port}",
            http=f"127.0.0.1:{http_port}",
            streams=[stream_table("EMB_IN", "embin.>"), stream_table("EMB_OUT", "embout.>")],
        )
        + """
[[sources]]
name = "ingest"
type = "http"
path = "/orders"
subject = "embin.orders"

[[routes]]
name = "forward"
from = "embin.orders"
transform = "{id: id}"
to = ["embout.orders"]
ack_wait = "2s"
retry = { max_attempts = 1000, backoff = "100ms", max_backoff = "1s" }

[[sinks]]
name = "file"
type = "file"
from = "embout.orders"
path = "out/orders.jsonl"
ack_wait = "2s"
retry = { max_attempts = 1000, backoff = "100ms", max_backoff = "1s" }
circuit = { failures = 0 }
"""
    )


class Client:
    """Posts 0..TOTAL-1 with `Idempotency-Key`, each retried until its 202."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.accepted = 0
        self.retries = 0
        self._next = 0

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=30) as http, anyio.create_task_group() as tg:
            for _ in range(CONCURRENCY):
                tg.start_soon(self._worker, http)

    async def _worker(self, http: httpx.AsyncClient) -> None:
        while self._next < TOTAL:
            n = self._next
            self._next += 1
            headers = {"Idempotency-Key": f"order-{n}", "content-type": "application/json"}
            while True:
                try:
                    response = await http.post(
                        self.url, content=orjson.dumps({"id": n}), headers=headers
                    )
                except httpx.TransportError:
                    response = None
                if response is not None and response.status_code == 202:
                    self.accepted += 1
                    break
                assert response is None or response.status_code == 503, response.text
                self.retries += 1
                await anyio.sleep(0.05)


class HealthWatch:
    """Polls `/healthz` and records each change of its status code."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.changes: list[int] = []

    @property
    def last(self) -> int | None:
        return self.changes[-1] if self.changes else None

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            while True:
                try:
                    code = (await http.get(self.url)).status_code
                except httpx.TransportError:  # a slow answer under load: no observation
                    code = None
                if code is not None and code != self.last:
                    self.changes.append(code)
                await anyio.sleep(0.02)


async def test_embedded_server_sigkills_lose_and_duplicate_nothing(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(nats_port, http_port))
    pid_file = tmp_path / "var" / "nats" / "nats-server.pid"
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    seed = int(os.environ.get("BUSWAY_FAULT_SEED") or random.randrange(1_000_000))
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(TOTAL // 10, TOTAL * 8 // 10), KILLS))
    client = Client(f"http://127.0.0.1:{http_port}/orders")
    health = HealthWatch(f"http://127.0.0.1:{http_port}/healthz")
    url = f"nats://127.0.0.1:{nats_port}"
    killed: list[int] = []

    async def killer() -> None:
        for threshold in thresholds:

            async def reached(threshold: int = threshold) -> bool:
                return client.accepted >= threshold

            await eventually(reached, timeout=240)
            pid = int(pid_file.read_text())
            assert pid not in killed, "the pid file must name the running server"
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

            async def unhealthy_then_healthy() -> bool:
                return health.changes.count(503) == len(killed) and health.last == 200

            await eventually(unhealthy_then_healthy, timeout=60)

    try:
        daemon.start()
        await daemon.ready()
        async with anyio.create_task_group() as watching:
            watching.start_soon(health.run)
            async with anyio.create_task_group() as tg:
                tg.start_soon(killer)
                tg.start_soon(client.run)

            async def drained() -> bool:
                return await consumer_settled(
                    url, "EMB_IN", "busway-route-forward"
                ) and await consumer_settled(url, "EMB_OUT", "busway-sink-file")

            await eventually(drained, timeout=180)
            inputs = await read_stream(url, "EMB_IN")
            outputs = await read_stream(url, "EMB_OUT")
            dead = await read_stream(url, "BUSWAY_DEADLETTER")
            watching.cancel_scope.cancel()
        assert await daemon.stop() == 0
    finally:
        daemon.kill()
    log = daemon.output()
    lines = (tmp_path / "out" / "orders.jsonl").read_bytes().splitlines()
    sent = range(TOTAL)
    figures = [
        Figures.of(
            "embedded-kill:input-stream", sent, [orjson.loads(m.data)["id"] for m in inputs]
        ),
        Figures.of(
            "embedded-kill:output-stream", sent, [orjson.loads(m.data)["id"] for m in outputs]
        ),
        Figures.of(
            "embedded-kill:file",
            sent,
            [orjson.loads(line)["id"] for line in lines],
            kills=len(killed),
            http_retries=client.retries,
            healthz=health.changes,
            seed=seed,
        ),
    ]
    for each in figures:
        each.report()

    assert len(killed) == KILLS
    for each in figures:
        assert (each.delivered, each.lost, each.duplicated) == (TOTAL, 0, 0), each
    assert sorted(message_id(m) for m in inputs) == sorted(f"ingest:anon:order-{n}" for n in sent)
    assert dead == []
    # 200 at first, then 503 while each killed server was down and 200 once it was back.
    assert health.changes[: 1 + 2 * KILLS] == [200, *[503, 200] * KILLS], health.changes
    assert log.count("was killed by SIGKILL; restarting it on its store") == KILLS
    assert log.count(" back (pid ") == KILLS
