"""Helpers shared by the tests: a nats-server process, `busway run` daemons, free ports, polling,
stream reads."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path

import anyio
import httpx
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Bus, Config, default_registry
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


class Daemon:
    """`busway run CONFIG [ARGS]` in a child process, every incarnation's output in one log file.

    A kill and a restart append to the log, so a failure shows the whole history; `output()` is
    the current incarnation's part. Sync tests wait with `wait_ready()` / `terminate()`, async
    ones with `await ready()` / `await stop()`. Nothing but this process is ever signalled.
    """

    def __init__(
        self,
        config: Path,
        *args: str,
        log: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self.args = args
        self.log = log or config.with_suffix(f".{time.monotonic_ns()}.log")
        self.env = dict(env or {})
        """Variables added to the child's environment (e.g. BUSWAY_DAEMON)."""
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._offset = 0

    def start(self) -> Daemon:
        """Start a new incarnation (the previous one must have exited); returns self."""
        assert self.process is None or self.process.poll() is not None
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "busway", "run", str(self.config), *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        self.starts += 1
        return self

    def output(self) -> str:
        """This incarnation's output so far."""
        with open(self.log, "rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    @property
    def http_url(self) -> str:
        """Base URL of this incarnation's HTTP listener, read from its log (once it is ready)."""
        found = re.findall(r"HTTP listening on (\S+)", self.output())
        assert found, f"the daemon logged no HTTP listener:\n{self.output()}"
        return str(found[-1])

    def _is_ready(self, deadline: float, timeout: float) -> bool:
        """True on the "busway ready" line; fails with the output if it exited or hangs."""
        assert self.process is not None, "start() the daemon first"
        if "busway ready" in self.output():
            return True
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.output()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"daemon not ready after {timeout}s:\n{self.output()}")
        return False

    def wait_ready(self, timeout: float = 60) -> None:
        """Block until the daemon logs "busway ready"."""
        deadline = time.monotonic() + timeout
        while not self._is_ready(deadline, timeout):
            time.sleep(0.05)

    async def ready(self, timeout: float = 60) -> None:
        """Wait (without blocking the event loop) until the daemon logs "busway ready"."""
        deadline = time.monotonic() + timeout
        while True:
            if self._is_ready(deadline, timeout):
                return
            await anyio.sleep(0.05)

    def _signal_stop(self) -> subprocess.Popen[bytes]:
        assert self.process is not None, "start() the daemon first"
        self.process.send_signal(signal.SIGTERM)
        return self.process

    def _stop_failed(self, timeout: float) -> AssertionError:
        self.kill()
        return AssertionError(f"daemon did not stop in {timeout}s:\n{self.output()}")

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful stop) and block until the exit code."""
        process = self._signal_stop()
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise self._stop_failed(timeout) from None

    async def stop(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful stop) and wait for the exit code without blocking the loop."""
        process = self._signal_stop()
        deadline = time.monotonic() + timeout
        while (code := process.poll()) is None:
            if time.monotonic() > deadline:
                raise self._stop_failed(timeout)
            await anyio.sleep(0.05)
        return code

    def kill(self) -> None:
        """SIGKILL this incarnation (if it runs) and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class Daemons:
    """The daemons one test started (the `daemons` fixture kills any left running, by pid)."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def start(self, config: Path, *args: str, log: Path | None = None) -> Daemon:
        """Start `busway run config [args]` and remember it."""
        daemon = Daemon(config, *args, log=log)
        self.started.append(daemon)
        return daemon.start()

    def kill_all(self) -> None:
        for daemon in self.started:
            daemon.kill()


def started_daemons() -> Iterator[Daemons]:
    """Body of the `daemons` fixture: yields a `Daemons`, kills what is left afterwards."""
    daemons = Daemons()
    try:
        yield daemons
    finally:
        daemons.kill_all()


def decode_test_config(text: str, base_dir: Path) -> Config:
    """A Config from TOML `text` whose relative paths start at `base_dir`.

    A config without an `[http]` table gets a listener on a free port, and one without a
    `[nats]` table an embedded server on a free port: busway's defaults, ports 8080 and 4222,
    would collide between test runs sharing a machine (`tests.configs.config_toml` writes both
    tables; this catches the configs that only test the decoder).
    """
    registry = default_registry()
    if not re.search(r"^\[http\]", text, re.MULTILINE):
        text += '\n[http]\nlisten = "127.0.0.1:0"\n'
    if not re.search(r"^\[nats\]", text, re.MULTILINE):
        text += '\n[nats]\nlisten = "127.0.0.1:0"\n'
    return decode_config(
        text,
        file="test.toml",
        base_dir=str(base_dir),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )


def wait_for(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Block until `check()` is true (for sync tests); fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


async def readyz(bus: Bus) -> httpx.Response:
    """`GET /readyz` on the bus's own listener."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
        return await http.get("/readyz")


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
