"""The SSH server an `sftp` source or sink talks to, and the one place asyncssh is imported.

    [sources.server]                          # or [sinks.server]
    host = "sftp.partner.example"
    username = "busway"
    private_key = "keys/partner_ed25519"     # relative to the config file
    known_hosts = "keys/known_hosts"         # host keys are checked unless told otherwise

Authentication is by key only: a password in a config file ends up in backups and process
listings. The server's host key is checked against `known_hosts` by default; a mismatch is a
`StartupError` that says so (someone may be in the middle), never a silent retry.

asyncssh's exceptions are translated here, once (`mapped`): a refused or timed-out connection
and a lost session are `RetryableError` (the message or the poll is retried with back-off),
a rejected key or host key is `StartupError` (retrying cannot help: fix the config), an SFTP
status is `RemoteError` with its code, so callers can tell "no such file" from "failure".
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Annotated

import asyncssh
import msgspec

from busway import BuildContext, Duration, RetryableError, StartupError

__all__ = [
    "NO_SUCH_FILE",
    "REGULAR_FILE",
    "RemoteError",
    "SftpClient",
    "SftpServerConfig",
    "SshServer",
    "mapped",
    "write_file",
]

NO_SUCH_FILE = asyncssh.FX_NO_SUCH_FILE
REGULAR_FILE = asyncssh.FILEXFER_TYPE_REGULAR
SftpClient = asyncssh.SFTPClient


class SftpServerConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Where the SSH server is and how busway logs in (key authentication only)."""

    host: str
    """Host name or address of the SSH server."""
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 22
    """TCP port of the SSH server."""
    username: str
    """The account busway logs in as."""
    private_key: str
    """Path of the private key file (OpenSSH or PEM format; relative to the config file).
    Keep it readable by busway only."""
    passphrase_env: str | None = None
    """Name of an environment variable holding the private key's passphrase, if it has one
    (never the passphrase itself: config files get copied)."""
    known_hosts: str = "~/.ssh/known_hosts"
    """The known_hosts file the server's host key is checked against."""
    check_host_key: bool = True
    """`false` accepts any host key: only for throw-away test servers, never across a network
    someone else controls."""
    connect_timeout: Duration = Duration(10.0)
    """How long connecting and logging in may take before the attempt counts as failed."""
    keepalive: Duration = Duration(15.0)
    """Interval of SSH keep-alives, so a dead connection is noticed between polls."""

    def __post_init__(self) -> None:
        if float(self.connect_timeout) <= 0:
            raise ValueError("connect_timeout must be positive")


class RemoteError(Exception):
    """An SFTP request failed on the server; `code` is its SFTP status (e.g. NO_SUCH_FILE)."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code


@contextlib.contextmanager
def mapped(server: str, action: str) -> Iterator[None]:
    """Translate asyncssh's exceptions raised by `action` on `server` into busway's."""
    try:
        yield
    except asyncssh.SFTPError as exc:
        raise RemoteError(f"{action} on {server}: {exc.reason}", code=exc.code) from None
    except asyncssh.HostKeyNotVerifiable as exc:
        raise StartupError(
            f"{server}: the server's host key is not the one in known_hosts ({exc.reason}); "
            "if the server's key changed on purpose, update known_hosts, else someone may be "
            "intercepting the connection"
        ) from None
    except asyncssh.PermissionDenied:
        raise StartupError(
            f"{server}: the server refused the key (authentication failed); check `username` "
            "and that the public key is in the account's authorized_keys"
        ) from None
    except asyncssh.KeyImportError as exc:
        raise StartupError(f"{server}: cannot read the private key: {exc}") from None
    except (OSError, TimeoutError, asyncssh.Error) as exc:
        detail = getattr(exc, "reason", None) or str(exc) or type(exc).__name__
        raise RetryableError(f"{action} on {server} failed: {detail}") from None


class SshServer:
    """Opens SFTP sessions to one configured server."""

    def __init__(self, config: SftpServerConfig, context: BuildContext) -> None:
        self.config = config
        self.label = f"sftp://{config.username}@{config.host}:{config.port}"
        self._key = context.resolve_path(config.private_key)
        self._known_hosts: Path | None = (
            context.resolve_path(config.known_hosts) if config.check_host_key else None
        )

    def _passphrase(self) -> str | None:
        name = self.config.passphrase_env
        if name is None:
            return None
        value = os.environ.get(name)
        if value is None:
            raise StartupError(
                f"{self.label}: environment variable {name} (passphrase_env) is not set"
            )
        return value

    def _options(self) -> asyncssh.SSHClientConnectionOptions:
        config = self.config
        with mapped(self.label, "loading the keys"):
            if self._known_hosts is not None and not self._known_hosts.is_file():
                raise StartupError(
                    f"{self.label}: known_hosts file {self._known_hosts} does not exist; add the "
                    "server's host key (ssh-keyscan -p PORT HOST >> FILE, then verify it)"
                )
            try:
                key = asyncssh.read_private_key(self._key, self._passphrase())
            except OSError as exc:
                raise StartupError(
                    f"{self.label}: cannot read private_key {self._key}: {exc.strerror}"
                ) from None
            return asyncssh.SSHClientConnectionOptions(
                username=config.username,
                client_keys=[key],
                known_hosts=str(self._known_hosts) if self._known_hosts is not None else None,
                password=None,
                kbdint_auth=False,
                agent_path=None,
                connect_timeout=float(config.connect_timeout),
                login_timeout=float(config.connect_timeout),
                keepalive_interval=float(config.keepalive),
            )

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[SftpClient]:
        """A connected SFTP client, closed on exit; errors as `mapped` translates them."""
        options = self._options()
        with mapped(self.label, "connecting"):
            connection = await asyncssh.connect(self.config.host, self.config.port, options=options)
        try:
            with mapped(self.label, "starting SFTP"):
                client = await connection.start_sftp_client()
            try:
                yield client
            finally:
                client.exit()
        finally:
            connection.close()
            with contextlib.suppress(Exception):
                await connection.wait_closed()


async def write_file(sftp: SftpClient, path: str, data: bytes) -> None:
    """Create `path` with `data` and fsync it where the server can (OpenSSH's
    `fsync@openssh.com`), so the file is on the server's disk before the message is acked."""
    async with sftp.open(path, "wb") as remote:
        await remote.write(data)
        # A server without it cannot say; its own write-back decides.
        with contextlib.suppress(asyncssh.SFTPOpUnsupported):
            await remote.fsync()
