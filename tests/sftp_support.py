"""An OpenSSH server the SFTP tests start themselves: Debian's `sshd` on a free loopback port,
with a generated host key, one authorized client key and a temporary directory to serve.

Locally a missing `sshd` skips the tests with the package to install; under CI (`CI` or
`BUSWAY_REQUIRE_DATABASES` set, as `.ci/run` does, which installs openssh-server) it fails them.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.support import free_port, wait_for_port

SSHD = "/usr/sbin/sshd"

__all__ = ["SSHD", "SshServer", "require_sshd"]


def require_sshd() -> None:
    """Skip (locally) or fail (CI) when OpenSSH's server or ssh-keygen is not installed."""
    if Path(SSHD).is_file() and shutil.which("ssh-keygen"):
        return
    message = "sshd not installed: apt-get install -y openssh-server"
    if os.environ.get("CI") or os.environ.get("BUSWAY_REQUIRE_DATABASES"):
        pytest.fail(message)
    pytest.skip(message)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "busway-test", "-f", str(path)],
        check=True,
    )


class SshServer:
    """`sshd -D -e -f <temp config> -p <free port>`, serving SFTP to the current user.

    `client_key` is the private key it accepts, `known_hosts` the file with its host key,
    `root` an empty directory for the test's files. Running as root (CI), the config allows
    key-only root logins (`PermitRootLogin prohibit-password`).
    """

    def __init__(self, directory: Path) -> None:
        require_sshd()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.root = directory / "files"
        self.root.mkdir()
        self.host_key = directory / "host_ed25519"
        self.client_key = directory / "client_ed25519"
        _keygen(self.host_key)
        _keygen(self.client_key)
        authorized = directory / "authorized_keys"
        authorized.write_text(Path(f"{self.client_key}.pub").read_text())
        self.port = free_port()
        self.known_hosts = directory / "known_hosts"
        host_public = " ".join(Path(f"{self.host_key}.pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_public}\n")
        self.user = getpass.getuser()
        config = directory / "sshd_config"
        config.write_text(
            "ListenAddress 127.0.0.1\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {directory / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {authorized}\n"
            "PermitRootLogin prohibit-password\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "Subsystem sftp internal-sftp\n"
        )
        if os.geteuid() == 0:
            # sshd refuses to start without its privilege separation directory.
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self.log = directory / "sshd.log"
        self._config = config
        self.process: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart, on the same port and keys) the server."""
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self._config), "-p", str(self.port)],
                stdout=log,
                stderr=log,
            )
        try:
            wait_for_port(self.port)
        except TimeoutError:
            self.stop()
            raise TimeoutError(f"sshd did not start: {self.log.read_text()[-2000:]}") from None

    def stop(self) -> None:
        """Stop the listener and the sessions it forked, as a server going down would."""
        process = self.process
        if process is None:
            return
        self.process = None
        for session in _children(process.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(session, signal.SIGTERM)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def server_table(self, *, key: Path | None = None, known_hosts: Path | None = None) -> str:
        """The `server` sub-table of an sftp source or sink reaching this server (inline)."""
        return (
            f'server = {{ host = "127.0.0.1", port = {self.port}, username = "{self.user}", '
            f'private_key = "{key or self.client_key}", '
            f'known_hosts = "{known_hosts or self.known_hosts}" }}'
        )


def _children(pid: int) -> list[int]:
    """The pids whose parent is `pid` (sshd forks one process per connection)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name (in parentheses) may hold spaces: the parent pid follows it.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found
