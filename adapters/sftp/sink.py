"""The `sftp` sink: each message becomes one file in a remote directory.

    [[sinks]]
    name = "partner-invoices"
    type = "sftp"
    from = "invoices.out"
    path = "/inbox"                  # remote directory, created if missing
    name_template = "{id}.json"      # see busway.adapters._template (one safe file name)
    [sinks.server]
    host = "sftp.partner.example"
    username = "busway"
    private_key = "keys/partner_ed25519"

Each body is written under a temporary dot-name (`.<name>.busway-tmp`, which partners'
pollers skip) and renamed to its name only once complete, so a reader never sees half a file.
The name comes from the message by default from its id, so the sink is idempotent: a
redelivered or replayed message (same `Message.id`) finds its file already there and is not
written again. A batch shares one SSH session; files of a batch are written one after another
and each message's outcome is its own (`BatchError`).

Failures: a lost or refused connection is retryable (the engine naks with back-off and the
circuit breaker pauses the sink); the server refusing one file (permission denied, a quota) is
retryable too, since those are fixed on the server; a message whose file cannot be named (the
template's field is missing) is dead-lettered. A wrong key or host key stops start-up.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Sequence

import anyio

from busway import (
    BatchError,
    BuildContext,
    ConfigError,
    DeliveryError,
    Message,
    RetryableError,
    Sink,
    SinkConfig,
    StartupError,
)
from busway.adapters._template import MissingField, Template
from busway.adapters.sftp._server import (
    NO_SUCH_FILE,
    RemoteError,
    SftpClient,
    SftpServerConfig,
    SshServer,
    mapped,
    write_file,
)

__all__ = ["SftpSink", "SftpSinkConfig"]

logger = logging.getLogger("busway.adapters.sftp")

_UNSAFE = str.maketrans({"/": "_", "\\": "_", "\x00": "_"})
_MAX_NAME = 200


class SftpSinkConfig(SinkConfig, tag="sftp", frozen=True, kw_only=True):
    """A remote directory over SFTP; one file per message, written whole or not at all."""

    server: SftpServerConfig
    """The SSH server and the account: `[sinks.server]`."""
    path: str
    """The remote directory the files go to (absolute, or relative to the account's home);
    created at start-up if missing."""
    name_template: str = "{id}"
    """Each file's name, from the template syntax shared by every sink (`{id}`,
    `{header.Name}`, `{body.a.b}`, ...). Keep `{id}` in it: a name from the message id makes
    a redelivery find its file and skip it. Values are made safe (`/` becomes `_`)."""
    overwrite: bool = False
    """`true`: a file already there is replaced (the name carries a version, not an
    identity); `false`: it means the message was written before, and it is skipped."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ValueError("path must name the remote directory")
        template = Template.compile(self.name_template, where="$.name_template")
        if template.is_static:
            raise ValueError(
                f"name_template {self.name_template!r} is the same for every message: "
                "add a field such as {id}"
            )


def _safe_name(value: str) -> str:
    value = value.translate(_UNSAFE)[:_MAX_NAME]
    return "_" if value in ("", ".", "..") else value


class SftpSink(Sink):
    """Writes each message as one remote file, through a temporary name and a rename."""

    def __init__(self, config: SftpSinkConfig, context: BuildContext) -> None:
        self.config = config
        self.server = SshServer(config.server, context)
        try:
            self.template = Template.compile(config.name_template, escape=_safe_name)
        except ValueError as exc:
            raise ConfigError(str(exc), path="$.name_template") from None
        self._healthy = True
        self._prepared = False

    async def open(self) -> None:
        """Log in once, so a wrong key or host key stops start-up; unreachable is not fatal.

        The server may come back later: messages wait, naked with back-off, and readiness
        stays false until a write succeeds.
        """
        try:
            async with self.server.session() as sftp:
                await self._prepare(sftp)
        except RetryableError as exc:
            self._healthy = False
            # Said once here; each failed write says it again through its retryable error.
            logger.warning("%s not reachable yet, will retry: %s", self.server.label, exc)

    async def _prepare(self, sftp: SftpClient) -> None:
        if self._prepared:
            return
        with mapped(self.server.label, f"creating {self.config.path}"):
            await sftp.makedirs(self.config.path, exist_ok=True)
        self._prepared = True

    async def write(self, batch: Sequence[Message]) -> None:
        """Write each message's file; BatchError for those that failed."""
        failures: dict[int, DeliveryError] = {}
        named: list[tuple[int, str, bytes]] = []
        for index, message in enumerate(batch):
            try:
                name = self.template.render(message)
            except MissingField as exc:
                failures[index] = exc
                continue
            named.append((index, posixpath.join(self.config.path, name), message.data))
        try:
            async with self.server.session() as sftp:
                await self._prepare(sftp)
                for position, (index, target, data) in enumerate(named):
                    try:
                        await self._write_one(sftp, target, data)
                    except RemoteError as exc:
                        failures[index] = RetryableError(str(exc))
                    except RetryableError as exc:  # the session broke: the rest waits too
                        for later, _, _ in named[position:]:
                            failures[later] = exc
                        break
        except StartupError as exc:
            # The key or host key stopped working while running: nothing delivers until the
            # config is fixed; retryable so that nothing is lost meanwhile.
            self._healthy = False
            raise RetryableError(str(exc)) from None
        except RetryableError:
            self._healthy = False
            raise
        self._healthy = not any(isinstance(e, RetryableError) for e in failures.values())
        if failures:
            raise BatchError(failures)

    async def _write_one(self, sftp: SftpClient, target: str, data: bytes) -> None:
        label = self.server.label
        if not self.config.overwrite:
            with mapped(label, f"checking {target}"):
                if await sftp.exists(target):
                    return  # written before: a redelivery or a replay
        folder, name = posixpath.split(target)
        temporary = posixpath.join(folder, f".{name}.busway-tmp")
        with mapped(label, f"writing {temporary}"):
            await write_file(sftp, temporary, data)
        try:
            with mapped(label, f"renaming {temporary} to {name}"):
                if self.config.overwrite:
                    await sftp.posix_rename(temporary, target)
                else:
                    await sftp.rename(temporary, target)  # refuses an existing target
        except RemoteError as exc:
            if exc.code == NO_SUCH_FILE:
                raise
            # Another daemon wrote the same message meanwhile: its file is complete.
            with mapped(label, f"checking {target}"):
                if not await sftp.exists(target):
                    raise
                await sftp.remove(temporary)

    async def close(self) -> None:
        """Nothing stays open between batches."""
        await anyio.lowlevel.checkpoint()

    def ready(self) -> bool:
        """False after a failed write, until a write succeeds again."""
        return self._healthy
