"""A throwaway RabbitMQ node for tests and benches, from Debian's `rabbitmq-server`, owned by pid.

The node runs on free loopback ports (AMQP, Erlang distribution, and its own `epmd`, which this
module starts in the foreground so that it too is a child it can stop) with its Mnesia
database, logs and Erlang cookie in a fresh temporary directory; no system service is touched
and nothing of /etc/rabbitmq is read. A node takes about ten seconds to boot, so tests share one
per session (`tests/amqp/conftest.py`). `restart()` stops the node gracefully and starts it
again on the same ports and data: durable queues and persistent messages survive, as they do
when a production broker restarts.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["RabbitServer", "rabbitmq_available"]

RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
USER = "busway"
PASSWORD = "rabbit-test-secret"
_nodes = itertools.count(1)


def rabbitmq_available() -> bool:
    """True if Debian's rabbitmq-server (and the Erlang `epmd` it needs) is installed."""
    return RABBITMQ_SERVER.exists() and shutil.which("epmd") is not None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stop(process: subprocess.Popen[bytes] | None, timeout: float = 30) -> None:
    """SIGTERM the process group this module started (graceful), SIGKILL it if it hangs."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class RabbitServer:
    """One RabbitMQ node: `url` has user `busway` (administrator of vhost `/`)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="busway-rabbit-"))
        self.port = _free_port()
        self.dist_port = _free_port()
        self.epmd_port = _free_port()
        self.node = f"busway-test-{os.getpid()}-{next(_nodes)}@localhost"
        self.log = self.root / "server.log"
        (self.root / "rabbitmq.conf").write_text(
            f"listeners.tcp.1 = 127.0.0.1:{self.port}\n"
            f"default_user = {USER}\n"
            f"default_pass = {PASSWORD}\n"
            "loopback_users = none\n"
            "log.console = true\n"
            "log.console.level = warning\n"
            "log.file = false\n"
        )
        (self.root / "enabled_plugins").write_text("[].\n")
        self._epmd: subprocess.Popen[bytes] | None = None
        self._server: subprocess.Popen[bytes] | None = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"amqp://{USER}:{PASSWORD}@127.0.0.1:{self.port}/"

    def _environment(self) -> dict[str, str]:
        root = str(self.root)
        return {
            **os.environ,
            "HOME": root,  # the Erlang cookie
            "ERL_EPMD_PORT": str(self.epmd_port),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": f"{root}/mnesia",
            "RABBITMQ_LOG_BASE": f"{root}/log",
            "RABBITMQ_CONFIG_FILE": f"{root}/rabbitmq.conf",
            "RABBITMQ_ADVANCED_CONFIG_FILE": f"{root}/advanced.config",
            "RABBITMQ_CONF_ENV_FILE": f"{root}/rabbitmq-env.conf",
            "RABBITMQ_ENABLED_PLUGINS_FILE": f"{root}/enabled_plugins",
            "RABBITMQ_PLUGINS_EXPAND_DIR": f"{root}/plugins-expand",
            "RABBITMQ_PID_FILE": f"{root}/rabbitmq.pid",
        }

    def start(self, timeout: float = 120) -> None:
        """Start epmd (once) and the node; return when it accepts AMQP connections."""
        environment = self._environment()
        if self._epmd is None or self._epmd.poll() is not None:
            self._epmd = subprocess.Popen(
                ["epmd", "-port", str(self.epmd_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        with open(self.log, "ab") as log:
            self._server = subprocess.Popen(
                [str(RABBITMQ_SERVER)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                start_new_session=True,  # its own group: the shell, beam and helpers stop together
            )
        deadline = time.monotonic() + timeout
        while True:
            if self._server.poll() is not None:
                raise RuntimeError(
                    f"rabbitmq-server exited with {self._server.returncode}:\n"
                    + self.log.read_text(errors="replace")[-4000:]
                )
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"RabbitMQ not up after {timeout}s, see {self.log}"
                    ) from None
                time.sleep(0.1)
            else:
                return

    def stop(self) -> None:
        """Stop the node gracefully (epmd keeps running for a restart)."""
        _stop(self._server)

    def restart(self) -> None:
        """Stop the node and start it again on the same ports and data."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the node and epmd and remove the temporary directory."""
        self.stop()
        _stop(self._epmd, timeout=5)
        shutil.rmtree(self.root, ignore_errors=True)
