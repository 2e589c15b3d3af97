"""Throwaway database servers for tests and benches: PostgreSQL 15 and MariaDB, owned by pid.

Each runs from the distribution's binaries on a free loopback port with its data in a fresh
temporary directory, and is stopped (and its directory removed) by the code that started it;
no system service is touched. PostgreSQL refuses to run as root, so when the tests run as root
the cluster is created and started as the `postgres` user (`runuser`).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["MariaDBServer", "PostgresServer", "free_port", "mariadb_available"]

PG_BIN = Path(os.environ.get("BUSWAY_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_port(
    port: int, process: subprocess.Popen[bytes] | None, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s:\n{log.read_text()}")


class PostgresServer:
    """A PostgreSQL cluster from `initdb`, run by `pg_ctl` on 127.0.0.1:`port`.

    `fsync` off by default: tests kill processes, not the machine, and the page cache survives
    a process crash; commits stay synchronous, so a committed row survives `restart()`.
    """

    def __init__(self, *, fsync: bool = False) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="busway-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._user: str | None = "postgres" if os.geteuid() == 0 else None
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
        self._run(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--locale=C",
        )  # fmt: skip
        options = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.root),
            "fsync": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            "max_connections": "100",
            "shared_buffers": "128MB",
            "timezone": "UTC",
        }
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.writelines(f"{key} = '{value}'\n" for key, value in options.items())
        self.start()

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        command = list(args)
        if self._user is not None:
            command = ["runuser", "-u", self._user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, cwd=self.root)

    def start(self) -> None:
        """Start the cluster and wait until it accepts connections."""
        self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start")
        _wait_port(self.port, None, self.log, 60)

    def pid(self) -> int | None:
        """The postmaster's pid, from its pid file (None when stopped)."""
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, mode: str = "fast") -> None:
        """Stop with `pg_ctl stop -m mode` (`immediate` is a crash: no checkpoint)."""
        if self.pid() is None:
            return
        try:
            self._run(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        except subprocess.CalledProcessError:
            pid = self.pid()
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def close(self) -> None:
        """Stop the cluster and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def mariadb_available() -> bool:
    """True if Debian's mariadb-server binaries are installed."""
    return shutil.which("mariadbd") is not None and shutil.which("mariadb-install-db") is not None


class MariaDBServer:
    """A MariaDB server on a fresh datadir (`mariadb-install-db`), as a child process.

    `root` has an empty password over TCP from 127.0.0.1. InnoDB writes its log at each commit
    but flushes it once a second (`innodb_flush_log_at_trx_commit = 2`): committed rows survive
    a process kill, not a power cut, which is all these tests simulate.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="busway-mariadb-"))
        self.data = self.root / "data"
        self.log = self.root / "mariadb.log"
        self.process: subprocess.Popen[bytes] | None = None
        subprocess.run(
            [
                "mariadb-install-db", "--no-defaults", f"--datadir={self.data}", "--user=root",
                "--auth-root-authentication-method=normal", "--skip-test-db",
                "--skip-name-resolve",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        self.start()

    @property
    def dsn(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/busway"

    def start(self) -> None:
        """Start `mariadbd` and wait until it accepts connections."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [
                    "mariadbd", "--no-defaults", f"--datadir={self.data}", "--user=root",
                    f"--port={self.port}", "--bind-address=127.0.0.1",
                    f"--socket={self.root / 'mariadb.sock'}", f"--pid-file={self.root / 'pid'}",
                    "--skip-name-resolve", "--skip-log-bin", "--innodb-buffer-pool-size=64M",
                    "--innodb-flush-log-at-trx-commit=2", "--max-connections=200",
                    "--character-set-server=utf8mb4", "--collation-server=utf8mb4_bin",
                    "--default-time-zone=+00:00",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        _wait_port(self.port, self.process, self.log, 60)

    def create_database(self, name: str) -> None:
        """Create database `name` (as root, over the server's socket)."""
        subprocess.run(
            [
                "mariadb", "--no-defaults", f"--socket={self.root / 'mariadb.sock'}", "-uroot",
                "-e", f"CREATE DATABASE IF NOT EXISTS `{name}`",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with `kill`) and wait for it to exit."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
