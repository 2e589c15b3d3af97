"""`/status` and `busway status`: per component state, counters, backlog and last error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import msgspec
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, ComponentStatus, StatusReport
from busway._observe.status import format_status
from tests.configs import config_toml, io_streams
from tests.support import (
    Daemons,
    NatsServer,
    decode_test_config,
    eventually,
    free_port,
    run_cli,
    wait_settled,
)


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


# The /status JSON, key for key: what `busway status --json` users and dashboards parse.
COMMON_KEYS = [
    "kind",
    "name",
    "ready",
    "received",
    "published",
    "filtered",
    "dead_lettered",
    "retried",
    "in_flight",
    "rate_in",
    "rate_out",
    "errors",
    "last_error",
    "last_error_at",
]
BACKLOG_KEYS = ["pending", "ack_pending", "redelivered"]


@pytest.mark.anyio
async def test_status_json_keeps_its_keys_order_and_types(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    text = config_text(nats_server, unique) + (
        f'\n[[sources]]\nname = "api{unique}"\ntype = "http"\npath = "/in"\n'
        f'subject = "in{unique}.orders"\n'
    )
    config = decode_test_config(text, tmp_path)
    async with Bus(config) as bus, httpx.AsyncClient() as client:
        posted = await client.post(f"http://127.0.0.1:{bus.http_port}/in", json={"total": 5})
        assert posted.status_code == 202
        report: dict[str, Any] = {}

        async def sink_done() -> bool:
            nonlocal report
            report = (await client.get(f"http://127.0.0.1:{bus.http_port}/status")).json()
            sink = next(c for c in report["components"] if c["kind"] == "sink")
            return (sink["published"], sink["in_flight"], sink["ack_pending"]) == (1, 0, 0)

        await eventually(sink_done)
    assert list(report) == ["status", "nats", "not_ready", "components"]
    assert (report["status"], report["nats"], report["not_ready"]) == ("ready", True, {})
    by_kind = {c["kind"]: c for c in report["components"]}
    assert list(by_kind["source"]) == COMMON_KEYS
    assert list(by_kind["route"]) == COMMON_KEYS + BACKLOG_KEYS
    assert list(by_kind["sink"]) == [*COMMON_KEYS, "circuit", *BACKLOG_KEYS]
    sink = by_kind["sink"]
    assert sink == {
        "kind": "sink",
        "name": f"f{unique}",
        "ready": True,
        "received": 1,
        "published": 1,
        "filtered": 0,
        "dead_lettered": 0,
        "retried": 0,
        "in_flight": 0,
        "rate_in": sink["rate_in"],
        "rate_out": sink["rate_out"],
        "errors": {},
        "last_error": None,
        "last_error_at": None,
        "circuit": "closed",
        "pending": 0,
        "ack_pending": 0,
        "redelivered": 0,
    }
    assert isinstance(sink["rate_in"], float) and isinstance(sink["rate_out"], float)


@pytest.mark.anyio
async def test_status_is_a_typed_report_that_serialises_to_the_status_json(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server, unique), tmp_path)
    async with Bus(config) as bus:
        js = nc.jetstream()
        for body in (b'{"total": 5}', b"not json"):
            await js.publish(f"in{unique}.orders", body)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-f{unique}")
        report = await bus.status()

        async def sink_done() -> bool:
            nonlocal report
            report = await bus.status()
            sink = report.component("sink", f"f{unique}")
            return sink is not None and (sink.published, sink.in_flight) == (1, 0)

        await eventually(sink_done)
        async with httpx.AsyncClient() as client:
            served = (await client.get(f"http://127.0.0.1:{bus.http_port}/status")).json()
    assert isinstance(report, StatusReport) and report.ready
    route = report.component("route", f"r{unique}")
    sink = report.component("sink", f"f{unique}")
    assert isinstance(route, ComponentStatus) and isinstance(sink, ComponentStatus)
    assert (route.received, route.published, route.dead_lettered) == (2, 1, 1)
    assert route.last_error is not None and route.last_error.startswith("decode: body is not")
    assert (route.pending, route.ack_pending, route.circuit) == (0, 0, None)
    assert (sink.circuit, sink.published, sink.in_flight) == ("closed", 1, 0)
    assert report.reason(sink) is None and report.component("sink", "nope") is None
    as_json = msgspec.to_builtins(report)
    # The served report is a moment later: rates may have been resampled in between.
    for entry in [*as_json["components"], *served["components"]]:
        del entry["rate_in"], entry["rate_out"]
    assert as_json == served
