"""The embedded nats-server under supervision: restarted on its store, never replaced.

A Bus runs in-process with its embedded server; the tests kill that server (SIGKILL, by the pid
its pid file holds) and check what busway does: restart it and carry on, give up after too
many deaths in a row, and stop rather than talk to another server that took its port.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import orjson
import pytest

import busway._nats.embedded
from busway import Bus, StartupError
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, eventually, free_port

pytestmark = pytest.mark.anyio


def config_text(port: int = 0) -> str:
    return (
        config_toml(
            None,
            data_dir="nats",
            nats_listen=f"127.0.0.1:{port}",
            http="",
            streams=[stream_table("ORDERS", "orders.>")],
        )
        + """
[[routes]]
name = "forward"
from = "orders.in"
to = ["orders.out"]
ack_wait = "2s"
"""
    )


def server_pid(tmp_path: Path) -> int:
    return int((tmp_path / "nats" / "nats-server.pid").read_text())


async def kill_server(bus: Bus, tmp_path: Path) -> int:
    """SIGKILL the running embedded server; wait until busway has seen it die."""
    pid = server_pid(tmp_path)
    os.kill(pid, signal.SIGKILL)

    async def seen_down() -> bool:
        return bus.health() == {"embedded_nats": False}

    await eventually(seen_down)
    return pid


@pytest.fixture
def quick_restarts() -> Iterator[None]:
    """Restart delays of 50 ms, so that giving up takes a second, not half a minute."""
    saved = busway._nats.embedded.RESTART_DELAYS
    busway._nats.embedded.RESTART_DELAYS = (0.05, 0.05)
    yield
    busway._nats.embedded.RESTART_DELAYS = saved


async def test_a_killed_server_is_restarted_on_its_store_and_flow_resumes(tmp_path: Path) -> None:
    config = decode_test_config(config_text(), tmp_path)
    async with Bus(config) as bus:
        assert bus.health() == {"embedded_nats": True}
        client = await nats.connect(bus.nats_url or "", max_reconnect_attempts=-1)
        js = client.jetstream()
        await js.publish("orders.in", orjson.dumps({"n": 1}), headers={"Nats-Msg-Id": "1"})
        first = await kill_server(bus, tmp_path)

        async def back() -> bool:
            return bus.health() == {"embedded_nats": True} and bus.readiness()["nats"]

        await eventually(back)
        assert server_pid(tmp_path) != first
        await js.publish("orders.in", orjson.dumps({"n": 2}), headers={"Nats-Msg-Id": "2"})

        async def both_routed() -> bool:
            return (await js.stream_info("ORDERS")).state.messages == 4

        await eventually(both_routed)
        await client.close()


async def test_a_server_that_keeps_dying_stops_the_bus_with_the_reason(
    tmp_path: Path, quick_restarts: None
) -> None:
    config = decode_test_config(config_text(), tmp_path)

    async def kill_three_times() -> None:
        async with Bus(config) as bus:
            for _ in range(3):
                await kill_server(bus, tmp_path)

                async def restarted_or_stopping() -> bool:
                    return bus.stopping or bus.health() == {"embedded_nats": True}

                await eventually(restarted_or_stopping)
            with anyio.fail_after(30):
                await bus.wait_until_stopped()

    with pytest.raises(StartupError, match="was killed by SIGKILL 3 times in a row; giving up"):
        await kill_three_times()


# nats-py leaks the stream of a reconnect attempt that got no INFO (the squatter accepts TCP
# and never speaks NATS): a ResourceWarning from nats-py's transport, not from busway.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_a_process_that_takes_the_port_while_the_server_is_down_stops_the_bus(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = decode_test_config(config_text(port), tmp_path)
    squatter = socket.socket()
    # As servers do (nats-server too): the killed server's connections linger in TIME_WAIT.
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    async def kill_and_take_the_port() -> None:
        async with Bus(config) as bus:
            os.kill(server_pid(tmp_path), signal.SIGKILL)
            # Take the port the moment the kernel frees it: busway waits 1 s to restart.
            deadline = time.monotonic() + 10
            while True:
                try:
                    squatter.bind(("127.0.0.1", port))
                    break
                except OSError:
                    assert time.monotonic() < deadline, "the killed server kept its port"
                    await anyio.sleep(0.005)
            squatter.listen(16)
            with anyio.fail_after(60):
                await bus.wait_until_stopped()

    try:
        with pytest.raises(StartupError, match=rf"127\.0\.0\.1:{port} .* by another process"):
            await kill_and_take_the_port()
    finally:
        squatter.close()


async def test_reconnecting_to_another_server_on_the_port_stops_the_bus_untouched(
    tmp_path: Path,
) -> None:
    """Another nats-server (a second deployment) takes the port while ours is down, before
    our restart: the client reconnects to it, sees a foreign server name, and busway stops
    without declaring, pulling or publishing anything there."""
    saved = busway._nats.embedded.RESTART_DELAYS
    busway._nats.embedded.RESTART_DELAYS = (120.0,)  # the other server gets the port first
    port = free_port()
    config = decode_test_config(config_text(port), tmp_path)
    (tmp_path / "other").mkdir()
    other: NatsServer | None = None

    async def kill_and_let_another_server_in() -> None:
        nonlocal other
        async with Bus(config) as bus:
            await kill_server(bus, tmp_path)
            other = await anyio.to_thread.run_sync(
                lambda: NatsServer(
                    tmp_path / "other", port=port, extra_config='server_name: "intruder"'
                )
            )
            with anyio.fail_after(60):
                await bus.wait_until_stopped()

    try:
        with pytest.raises(StartupError, match="reconnected to a NATS server named 'intruder'"):
            await kill_and_let_another_server_in()
        assert other is not None
        client = await nats.connect(other.url)
        try:
            assert (await client.jetstream().account_info()).streams == 0
        finally:
            await client.close()
    finally:
        busway._nats.embedded.RESTART_DELAYS = saved
        if other is not None:
            other.stop()
