"""`/status` and `busway status`: per component state, counters, backlog and last error."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from busway._observe.status import format_status
from tests.configs import config_toml, io_streams
from tests.support import Daemons, NatsServer, decode_test_config, free_port, run_cli, wait_settled


def config_text(server: NatsServer, unique: str, listen: str = "127.0.0.1:0") -> str:
    return (
        config_toml(
            server,
            http=listen,
            streams=io_streams(unique),
        )
        + f"""
[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
when = "total > `1`"
to = ["out{unique}.big"]

[[sinks]]
name = "f{unique}"
type = "file"
from = "out{unique}.big"
path = "out.jsonl"
"""
    )


@pytest.mark.anyio
async def test_status_reports_counters_backlog_and_the_last_error(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server, unique), tmp_path)
    async with Bus(config) as bus:
        js = nc.jetstream()
        for body in (b'{"total": 5}', b'{"total": 0}', b"not json"):
            await js.publish(f"in{unique}.orders", body)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-f{unique}")
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{bus.http_port}/status")
    report = response.json()
    assert report["status"] == "ready" and report["nats"] is True
    route, sink = (
        next(c for c in report["components"] if c["kind"] == kind) for kind in ("route", "sink")
    )
    assert (route["received"], route["published"], route["filtered"]) == (3, 1, 1)
    assert route["dead_lettered"] == 1
    assert route["pending"] == 0 and route["ack_pending"] == 0
    assert route["last_error"].startswith("decode: body is not valid JSON")
    assert route["last_error_at"] is not None
    assert sink["circuit"] == "closed" and sink["published"] == 1
    assert [orjson.loads(line) for line in (tmp_path / "out.jsonl").read_bytes().splitlines()] == [
        {"total": 5}
    ]
    table = format_status(report)
    assert f"r{unique}" in table and "closed" in table
    assert f"route r{unique}: last error at" in table


def test_busway_status_reads_the_running_daemon(
    nats_server: NatsServer,
    unique: str,
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    path = tmp_path / "busway.toml"
    path.write_text(config_text(nats_server, unique, f"127.0.0.1:{free_port()}"))
    result = run_cli("status", str(path))
    assert result.returncode == 1
    assert "is `busway run` running?" in result.stderr
    daemon = daemons.start(path)
    daemon.wait_ready()
    result = run_cli("status", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("busway: ready (nats up)")
    assert f"r{unique}" in result.stdout and f"f{unique}" in result.stdout
    as_json = run_cli("status", str(path), "--json")
    assert {c["name"] for c in orjson.loads(as_json.stdout)["components"]} == {
        f"r{unique}",
        f"f{unique}",
    }
    assert daemon.terminate() == 0
