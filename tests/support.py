"""Helpers shared by the tests: a nats-server process, free ports, polling, stream reads."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import anyio
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Config, default_registry
from busway._config.model import decode_config
from busway._nats.embedded import find_nats_server

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


class NatsServer:
    """A nats-server child process with JetStream, owned by the tests."""

    def __init__(
        self,
        store: Path,
        *,
        sync_always: bool = False,
        port: int | None = None,
        extra_config: str = "",
    ) -> None:
        """`extra_config`: more server config lines (authorization, operator, server_name)."""
        self.port = port or free_port()
        self.store = store
        config = store / "nats.conf"
        sync = "\n  sync_interval: always" if sync_always else ""
        config.write_text(
            f'listen: "127.0.0.1:{self.port}"\n'
            f'jetstream {{\n  store_dir: "{store / "js"}"{sync}\n}}\n{extra_config}\n'
        )
        self.log = store / "nats.log"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [find_nats_server(), "-c", str(config)], stdout=log, stderr=log
            )
        wait_for_port(self.port)

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `busway ARGS` as a subprocess of this Python; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "busway", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


def decode_test_config(text: str, base_dir: Path) -> Config:
    """A Config from TOML `text` whose relative paths start at `base_dir`.

    A config without an `[http]` table gets a listener on a free port: busway's default,
    127.0.0.1:8080, would collide between test runs sharing a machine.
    """
    registry = default_registry()
    if not re.search(r"^\[http\]", text, re.MULTILINE):
        text += '\n[http]\nlisten = "127.0.0.1:0"\n'
    return decode_config(
        text,
        file="test.toml",
        base_dir=str(base_dir),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 30.0) -> None:
    """Poll `check` until it is true; fail the test with a clear message after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition {check.__name__} not met within {timeout}s")
        await anyio.sleep(0.05)


async def consumer_settled(nc: NatsClient, stream: str, durable: str) -> bool:
    """True when the consumer has nothing pending and nothing awaiting an ack."""
    info = await nc.jetstream().consumer_info(stream, durable)
    return info.num_pending == 0 and info.num_ack_pending == 0


async def wait_settled(nc: NatsClient, stream: str, durable: str, timeout: float = 30.0) -> None:
    """Wait until the consumer `durable` of `stream` has nothing pending and nothing un-acked."""

    async def settled() -> bool:
        return await consumer_settled(nc, stream, durable)

    await eventually(settled, timeout=timeout)


async def stream_messages(nc: NatsClient, stream: str) -> list[Msg]:
    """Every message currently in `stream`, in order, read through an ephemeral consumer."""
    js = nc.jetstream()
    expected = (await js.stream_info(stream)).state.messages
    subscription = await js.pull_subscribe(">", stream=stream)
    messages: list[Msg] = []
    try:
        while len(messages) < expected:
            batch = await subscription.fetch(min(1000, expected - len(messages)), timeout=5)
            for message in batch:
                await message.ack()
            messages.extend(batch)
    finally:
        await subscription.unsubscribe()
    return messages
