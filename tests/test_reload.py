"""Hot reload: routes added, removed and changed under load lose and duplicate nothing."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, ConfigError
from tests.configs import FREE, config_toml, io_streams
from tests.support import (
    Daemons,
    NatsServer,
    decode_test_config,
    eventually,
    free_port,
    run_cli,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def config_text(server: NatsServer, unique: str, routes: str) -> str:
    return config_toml(server, streams=io_streams(unique), body=routes)


def route(name: str, unique: str, transform: str, source: str = "orders") -> str:
    return f"""
[[routes]]
name = "{name}{unique}"
from = "in{unique}.{source}"
transform = "{transform}"
to = ["out{unique}.{name}"]
"""


async def test_reload_under_load_adds_removes_and_swaps_routes(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    before = decode_test_config(
        config_text(
            nats_server,
            unique,
            route("main", unique, "{id: id, v: `1`}") + route("old", unique, "@", "legacy"),
        ),
        tmp_path,
    )
    after = decode_test_config(
        config_text(
            nats_server,
            unique,
            route("main", unique, "{id: id, v: `2`}") + route("extra", unique, "{id: id}"),
        ),
        tmp_path,
    )
    count = 3000
    js = nc.jetstream()
    async with Bus(before) as bus:

        async def publish() -> None:
            for i in range(count):
                await js.publish(f"in{unique}.orders", orjson.dumps({"id": i}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(publish)

            async def some_routed() -> bool:
                return (await js.stream_info(f"OUT_{unique}")).state.messages > 200

            await eventually(some_routed)
            report = await bus.reload(after)
        assert report.added == [f"route:extra{unique}"]
        assert report.removed == [f"route:old{unique}"]
        assert report.changed == [f"route:main{unique}"]
        assert sorted(s.name for s in bus.metrics.stats) == [f"extra{unique}", f"main{unique}"]
        await wait_settled(nc, f"IN_{unique}", f"busway-route-main{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-extra{unique}")

    outputs = await stream_messages(nc, f"OUT_{unique}")
    main = [orjson.loads(m.data) for m in outputs if m.subject == f"out{unique}.main"]
    ids = [body["id"] for body in main]
    assert sorted(ids) == list(range(count)), "every input routed exactly once by main"
    versions = {body["v"] for body in main}
    assert versions == {1, 2}, "some by the old route, the rest by the new one"
    # The new route starts from the beginning of its (new) consumer: all of them.
    extra = [orjson.loads(m.data)["id"] for m in outputs if m.subject == f"out{unique}.extra"]
    assert sorted(extra) == list(range(count))


async def test_a_reload_that_needs_a_restart_is_refused(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    text = config_text(nats_server, unique, route("main", unique, "@"))
    config = decode_test_config(text, tmp_path)
    moved = text.replace(f'listen = "{FREE}"', f'listen = "127.0.0.1:{free_port()}"')
    changed = decode_test_config(moved, tmp_path)
    async with Bus(config) as bus:
        with pytest.raises(ConfigError, match=r"\[http\] changed: that needs a restart"):
            await bus.reload(changed)
        assert [s.name for s in bus.metrics.stats] == [f"main{unique}"]


def test_sighup_reloads_and_a_bad_config_keeps_the_old_one(
    nats_server: NatsServer,
    unique: str,
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    path = tmp_path / "busway.toml"
    path.write_text(config_text(nats_server, unique, route("main", unique, "@")))
    daemon = daemons.start(path)
    daemon.wait_ready()

    path.write_text(
        config_text(nats_server, unique, route("main", unique, "@") + route("extra", unique, "@"))
    )
    result = run_cli("reload", str(path))
    assert result.returncode == 0, result.stderr
    assert f"reload done: added: route:extra{unique}" in result.stdout

    def log_says(text: str) -> None:
        deadline = time.monotonic() + 30
        while text not in daemon.output():
            assert time.monotonic() < deadline, daemon.output()
            time.sleep(0.05)

    log_says(f"reload done: added: route:extra{unique}")

    path.write_text(path.read_text().replace('transform = "@"', 'transform = "a =="', 1))
    result = run_cli("reload", str(path))
    assert result.returncode == 2
    assert "not reloading: the config is invalid" in result.stderr
    daemon.process.send_signal(signal.SIGHUP)  # bypassing the check: still safe
    log_says("reload rejected, still running the previous config")
    assert daemon.process.poll() is None
    assert daemon.terminate() == 0


def test_busway_reload_reports_a_config_the_daemon_rejects(
    nats_server: NatsServer,
    unique: str,
    tmp_path: Path,
    daemons: Daemons,
) -> None:
    """`busway check` accepts it, the daemon refuses it: the command says so and exits 2."""
    path = tmp_path / "busway.toml"
    path.write_text(config_text(nats_server, unique, route("main", unique, "@")))
    daemon = daemons.start(path)
    daemon.wait_ready()

    moved = f'listen = "127.0.0.1:{free_port()}"'
    path.write_text(path.read_text().replace(f'listen = "{FREE}"', moved))
    rejected = run_cli("reload", str(path))
    assert rejected.returncode == 2, (rejected.stdout, rejected.stderr)
    assert "reload rejected, still running the previous config" in rejected.stderr
    assert "[http] changed: that needs a restart, not a reload" in rejected.stderr

    path.write_text(
        config_text(nats_server, unique, route("main", unique, "@") + route("extra", unique, "@"))
    )
    applied = run_cli("reload", str(path))
    assert applied.returncode == 0, applied.stderr
    assert f"reload done: added: route:extra{unique}" in applied.stdout
    assert daemon.terminate() == 0
