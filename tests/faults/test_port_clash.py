"""A second deployment started on the port of a running one's embedded nats-server.

Daemon A runs HTTP -> route -> file sink on its embedded server. Mid-flow, daemon B starts
with the same config (same route and sink names, so the same durable consumers) but its own
data_dir, HTTP port and output file: a copy-pasted deployment. Before, B logged "listening",
connected to A's server and took about half of A's messages into its own file. Now B finds the
port held by a server it did not start, says so in one line and exits 2; A delivers every
message once, and B's file never exists.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled, read_stream
from tests.support import Daemon, eventually, free_port, run_cli

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.faults,
    pytest.mark.slow,
    pytest.mark.timeout(600),
]

TOTAL = 2000


def daemon_config(nats_port: int, http_port: int, data_dir: Path, out: Path) -> str:
    return (
        config_toml(
            None,
            data_dir=data_dir,
            nats_listen=f"127.0.0.1:{nats_port}",
            http=f"127.0.0.1:{http_port}",
            streams=[stream_table("CLASH_IN", "clashin.>")],
        )
        + f"""
[[sources]]
name = "ingest"
type = "http"
path = "/orders"
subject = "clashin.orders"

[[routes]]
name = "forward"
from = "clashin.orders"
transform = "{{id: id}}"
to = ["clashin.routed"]

[[sinks]]
name = "file"
type = "file"
from = "clashin.routed"
path = "{out}"
"""
    )


async def test_a_second_deployment_on_the_same_port_takes_nothing(tmp_path: Path) -> None:
    nats_port, http_port = free_port(), free_port()
    first_out, second_out = tmp_path / "a" / "orders.jsonl", tmp_path / "b" / "orders.jsonl"
    first_config, second_config = tmp_path / "a.toml", tmp_path / "b.toml"
    first_config.write_text(daemon_config(nats_port, http_port, tmp_path / "a-nats", first_out))
    second_config.write_text(daemon_config(nats_port, free_port(), tmp_path / "b-nats", second_out))
    first = Daemon(first_config, log=tmp_path / "a.log")
    url = f"nats://127.0.0.1:{nats_port}"
    accepted = 0
    second_result = None

    async def send() -> None:
        nonlocal accepted
        async with httpx.AsyncClient(timeout=30) as http:
            for n in range(TOTAL):
                response = await http.post(
                    f"http://127.0.0.1:{http_port}/orders",
                    content=orjson.dumps({"id": n}),
                    headers={"Idempotency-Key": f"order-{n}", "content-type": "application/json"},
                )
                assert response.status_code == 202, response.text
                accepted += 1

    async def start_the_second_deployment() -> None:
        nonlocal second_result

        async def a_third_sent() -> bool:
            return accepted >= TOTAL // 3

        await eventually(a_third_sent, timeout=120)
        second_result = await anyio.to_thread.run_sync(run_cli, "run", str(second_config))

    try:
        first.start()
        await first.ready()
        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            tg.start_soon(start_the_second_deployment)

        async def drained() -> bool:
            return await consumer_settled(
                url, "CLASH_IN", "busway-route-forward"
            ) and await consumer_settled(url, "CLASH_IN", "busway-sink-file")

        await eventually(drained, timeout=120)
        stored = await read_stream(url, "CLASH_IN")
        assert await first.stop() == 0
    finally:
        first.kill()

    assert second_result is not None
    lines = second_result.stderr.splitlines()
    figures = Figures.of(
        "port-clash:file",
        range(TOTAL),
        [orjson.loads(line)["id"] for line in first_out.read_bytes().splitlines()],
        second_exit=second_result.returncode,
        second_file=second_out.exists(),
    ).report()
    assert second_result.returncode == 2, second_result.stderr
    assert len(lines) == 1, second_result.stderr
    assert (
        f"127.0.0.1:{nats_port} ([nats] listen) is already in use by another nats-server"
        in (lines[0])
    )
    assert (figures.delivered, figures.lost, figures.duplicated) == (TOTAL, 0, 0), figures
    assert not second_out.exists(), "the second deployment consumed the first one's messages"
    assert len([m for m in stored if m.subject == "clashin.routed"]) == TOTAL
