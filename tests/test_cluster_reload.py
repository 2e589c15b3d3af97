"""Reloads with several daemons on one config: consumers are shared, so say so, and list the
ones left behind.

Every daemon running a config pulls from the same durable consumer per route and sink
(`busway-route-<name>`): reloading one daemon with new consumer settings changes the consumer
under all of them. Before, that happened silently, and a removed route's consumer stayed on
its stream with nothing to show it.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from busway import Bus
from tests.support import NatsServer, decode_test_config, run_cli

pytestmark = pytest.mark.anyio


def config_text(url: str, unique: str, routes: str) -> str:
    return f"""
[nats]
servers = ["{url}"]

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]
{routes}
"""


def route(unique: str, name: str, *, max_in_flight: int = 64, to: str = "a") -> str:
    return f"""
[[routes]]
name = "{name}{unique}"
from = "in{unique}.{name}"
to = ["out{unique}.{to}"]
max_in_flight = {max_in_flight}
"""


async def test_a_reload_that_changes_a_consumer_says_it_applies_to_every_daemon(
    tmp_path: Path, nats_server: NatsServer, unique: str, caplog: pytest.LogCaptureFixture
) -> None:
    before = config_text(nats_server.url, unique, route(unique, "a") + route(unique, "b"))
    after = config_text(
        nats_server.url,
        unique,
        route(unique, "a", max_in_flight=128) + route(unique, "b", to="b"),
    )
    async with Bus(decode_test_config(before, tmp_path)) as bus:
        report = await bus.reload(decode_test_config(after, tmp_path))
    expected = (
        f"consumer busway-route-a{unique} (max_in_flight changed) is shared by every daemon on "
        "this config: the change applies to all of them"
    )
    assert [note[: len(expected)] for note in report.notes] == [expected]  # not route b: its
    assert expected in str(report)  # consumer is untouched when only `to` changes
    assert expected in caplog.text


async def test_status_orphans_lists_the_consumers_no_component_uses(
    tmp_path: Path, nats_server: NatsServer, unique: str
) -> None:
    both = config_text(nats_server.url, unique, route(unique, "a") + route(unique, "b"))
    async with Bus(decode_test_config(both, tmp_path)):
        pass  # declares both consumers
    config = tmp_path / "busway.toml"
    config.write_text(config_text(nats_server.url, unique, route(unique, "a")))
    result = await anyio.to_thread.run_sync(run_cli, "status", "--orphans", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any(f"IN_{unique}" in line and f"busway-route-b{unique}" in line for line in lines)
    assert not any(f"busway-route-a{unique}" in line for line in lines), result.stdout
    assert "nats consumer rm <STREAM> <CONSUMER>" in result.stdout
