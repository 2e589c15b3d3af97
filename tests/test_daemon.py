"""The daemon as a user runs it: `busway run` / `busway check` as subprocesses.

The quickstart runs the bundled example with its embedded nats-server on free ports; the crash
test kills a daemon with SIGKILL in the middle of 10,000 messages and checks the restarted one
leaves exactly 10,000 outputs: none lost, none duplicated.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path

import anyio
import httpx
import nats
import nats.js.errors
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.support import REPO, Daemons, NatsServer, free_port, run_cli, stream_messages, wait_for

EXAMPLE = REPO / "deploy" / "busway.toml"


def quickstart_config(tmp_path: Path) -> tuple[Path, int, int]:
    http_port, nats_port = free_port(), free_port()
    text = EXAMPLE.read_text()
    # The example's [http] listener is the first `listen` line: move it to a free port.
    text, moved = re.subn(
        r'listen = "127\.0\.0\.1:\d+"', f'listen = "127.0.0.1:{http_port}"', text, count=1
    )
    assert moved == 1, "the example has no [http] listen line to move"
    text = text.replace(
        'data_dir = "var/nats"', f'data_dir = "var/nats"\nlisten = "127.0.0.1:{nats_port}"'
    )
    config = tmp_path / "busway.toml"
    config.write_text(text)
    return config, http_port, nats_port


def test_busway_check_accepts_the_bundled_example() -> None:
    result = run_cli("check", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "ok (1 stream(s), 1 source(s), 2 route(s), 1 sink(s))" in result.stdout


def test_busway_check_reports_a_bad_expression_with_its_location(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(EXAMPLE.read_text().replace("total > `100`", "total >"))
    result = run_cli("check", str(config))
    assert result.returncode == 2
    line = (
        EXAMPLE.read_text()
        .splitlines()
        .index('when = "total > `100`"                              # JMESPath over the JSON body')
        + 1
    )
    assert f"{config}:{line} at $.routes[0].when:" in result.stderr


def test_busway_check_reports_config_errors_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(EXAMPLE.read_text().replace('to = ["orders.big"]', 'to = ["billing.big"]'))
    result = run_cli("check", str(config))
    assert result.returncode == 2
    assert "at $.routes[0].to[0]: no stream captures subject 'billing.big'" in result.stderr
    assert "Traceback" not in result.stderr


def test_busway_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    assert "run" in result.stdout and "check" in result.stdout


@pytest.mark.slow
def test_quickstart_end_to_end_survives_a_restart(tmp_path: Path, daemons: Daemons) -> None:
    config, http_port, nats_port = quickstart_config(tmp_path)
    out_file = tmp_path / "var" / "out" / "big-orders.jsonl"

    daemon = daemons.start(config)
    daemon.wait_ready()
    assert f"HTTP listening on http://127.0.0.1:{http_port}" in daemon.output()
    assert f"listening on nats://127.0.0.1:{nats_port}" in daemon.output()
    url = f"http://127.0.0.1:{http_port}/orders"
    big = {"id": 1, "total": 250, "customer": {"name": "Ada"}}
    small = {"id": 2, "total": 50, "customer": {"name": "Bob"}}
    assert httpx.post(url, json=big).status_code == 202
    assert httpx.post(url, json=small).status_code == 202
    wait_for(lambda: out_file.exists() and out_file.read_bytes().count(b"\n") == 1, "first line")
    assert daemon.terminate() == 0
    assert "stopped" in daemon.output()
    assert (tmp_path / "var" / "nats" / "jetstream").is_dir()

    restarted = daemons.start(config)
    restarted.wait_ready()
    assert httpx.post(url, json={**big, "id": 3}).status_code == 202
    wait_for(lambda: out_file.read_bytes().count(b"\n") == 2, "second line")
    lines = [orjson.loads(line) for line in out_file.read_bytes().splitlines()]
    assert lines == [
        {"id": 1, "total": 250, "customer": "Ada"},
        {"id": 3, "total": 250, "customer": "Ada"},
    ]

    async def count_big() -> int:
        client = await nats.connect(f"nats://127.0.0.1:{nats_port}")
        try:
            return len(
                [m for m in await stream_messages(client, "ORDERS") if m.subject == "orders.big"]
            )
        finally:
            await client.close()

    assert anyio.run(count_big) == 2
    assert restarted.terminate() == 0


@pytest.mark.slow
def test_sigkill_mid_flow_loses_and_duplicates_nothing(
    nats_server: NatsServer, tmp_path: Path, daemons: Daemons
) -> None:
    total = 10_000
    config = tmp_path / "crash.toml"
    config.write_text(
        config_toml(
            nats_server,
            streams=[
                stream_table("CRASH_IN", "crashin.>"),
                stream_table("CRASH_OUT", "crashout.>"),
            ],
        )
        + """
[[routes]]
name = "crash"
from = "crashin.orders"
when = "total > `-1`"
transform = "{id: id, total: total}"
to = ["crashout.orders"]
ack_wait = "2s"
"""
    )

    async def preload() -> None:
        client = await nats.connect(nats_server.url)
        js = client.jetstream(publish_async_max_pending=1000)
        await js.add_stream(name="CRASH_IN", subjects=["crashin.>"])
        for i in range(total):
            await js.publish_async("crashin.orders", orjson.dumps({"id": i, "total": i}))
        await js.publish_async_completed()
        await client.close()

    async def out_count() -> int:
        client = await nats.connect(nats_server.url)
        try:
            return (await client.jetstream().stream_info("CRASH_OUT")).state.messages
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await client.close()

    async def consumer_settled() -> bool:
        client = await nats.connect(nats_server.url)
        try:
            info = await client.jetstream().consumer_info("CRASH_IN", "busway-route-crash")
            return info.num_pending == 0 and info.num_ack_pending == 0
        finally:
            await client.close()

    async def output_ids() -> list[int]:
        client = await nats.connect(nats_server.url)
        try:
            return [orjson.loads(m.data)["id"] for m in await stream_messages(client, "CRASH_OUT")]
        finally:
            await client.close()

    anyio.run(preload)
    first = daemons.start(config)
    first.wait_ready()
    wait_for(lambda: anyio.run(out_count) >= 1000, "1000 outputs before the kill", timeout=60)
    first.kill()
    assert first.process.returncode == -signal.SIGKILL
    killed_at = anyio.run(out_count)
    assert killed_at < total, "the kill must land mid-flow"

    second = daemons.start(config)
    second.wait_ready()
    wait_for(lambda: anyio.run(consumer_settled), "consumer fully acked", timeout=120)
    ids = anyio.run(output_ids)
    assert len(ids) == total
    assert sorted(ids) == list(range(total))
    assert second.terminate() == 0
