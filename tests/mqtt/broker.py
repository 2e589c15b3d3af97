"""A throwaway Mosquitto broker for tests and benches, owned by pid.

Debian's `mosquitto` binary runs on a free loopback port with its persistence file, password
file and log in a fresh temporary directory; it is stopped (and its directory removed) by the
code that started it; no system service is touched. `restart()` keeps the directory, so a
persistent session and its queued QoS 1 messages survive it (Mosquitto writes them out when
it stops; a SIGKILL loses what it had not autosaved, a property of the broker, not of busway).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support import free_port, wait_for_port

__all__ = ["MosquittoBroker", "mosquitto_available"]


def _binary(name: str, directory: str) -> str:
    """`name` on PATH, else in `directory` (Debian puts the broker in /usr/sbin)."""
    return shutil.which(name) or f"{directory}/{name}"


MOSQUITTO = _binary("mosquitto", "/usr/sbin")
MOSQUITTO_PASSWD = _binary("mosquitto_passwd", "/usr/bin")


def mosquitto_available() -> bool:
    """True when Debian's `mosquitto` (and `mosquitto_passwd`) are installed."""
    return Path(MOSQUITTO).is_file() and Path(MOSQUITTO_PASSWD).is_file()


class MosquittoBroker:
    """`mosquitto -c <temp conf>` on 127.0.0.1:`port`; `users` need a password to log in."""

    def __init__(self, *, users: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="busway-mosquitto-"))
        self.users = dict(users or {})
        self.process: subprocess.Popen[bytes] | None = None
        passwords = self.root / "passwords"
        if self.users:
            passwords.touch(mode=0o600)
            for user, password in self.users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(passwords), user, password],
                    check=True,
                    capture_output=True,
                )
        lines = [
            f"listener {self.port} 127.0.0.1",
            "user root" if _is_root() else "",
            "persistence true",
            f"persistence_location {self.root}/",
            "max_queued_messages 0",  # unlimited: a test's messages are never dropped
            "max_inflight_messages 100",
            "log_type error",
            "log_type warning",
            f"log_dest file {self.root}/mosquitto.log",
        ]
        if self.users:
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.config = self.root / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.start()

    @property
    def url(self) -> str:
        """The broker's `mqtt://` URL."""
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the broker and wait until it accepts connections."""
        log = open(self.root / "stdout.log", "ab")  # noqa: SIM115 - the child keeps it
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        log.close()
        try:
            wait_for_port(self.port, timeout=20)
        except TimeoutError:
            self.stop(kill=True)
            raise

    def stop(self, *, kill: bool = False) -> None:
        """Stop the broker (SIGTERM: it saves its sessions; SIGKILL with `kill`)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop and start again on the same port and persistence file."""
        self.stop()
        self.start()

    def close(self) -> None:
        """Stop the broker and remove its directory."""
        self.stop()
        with contextlib.suppress(OSError):
            shutil.rmtree(self.root)


def _is_root() -> bool:
    import os

    return os.geteuid() == 0


def wait_closed(port: int, timeout: float = 10.0) -> None:
    """Block until nothing accepts connections on 127.0.0.1:`port`."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        except OSError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} still accepts connections after {timeout}s")


class Subscriber:
    """A persistent MQTT session that reads, on demand, what the broker queued for it.

    `subscribe()` once; each `drain()` connects with the same client id, reads every message
    queued since, and stops at a marker it publishes to itself (the broker delivers a
    session's queue in order, so the marker comes last): no waiting for silence.
    """

    def __init__(self, broker: MosquittoBroker, topics: list[str], *, client_id: str) -> None:
        self.broker = broker
        self.topics = topics
        self.client_id = client_id
        self.received: list[tuple[str, bytes]] = []

    async def subscribe(self) -> None:
        """Create the session and its subscriptions (QoS 1)."""
        import aiomqtt

        async with self._client(aiomqtt) as client:
            await client.subscribe([(topic, 1) for topic in [*self.topics, self._marker_filter]])

    async def drain(self) -> list[tuple[str, bytes]]:
        """Everything received so far (topic, payload), this drain's messages appended."""
        import uuid

        import aiomqtt

        marker = f"{self._marker_filter[:-2]}/{uuid.uuid4().hex}"
        async with self._client(aiomqtt) as client:
            await client.subscribe([(topic, 1) for topic in [*self.topics, self._marker_filter]])
            await client.publish(marker, b"", qos=1)
            async for message in client.messages:
                if message.topic.value == marker:
                    break
                if not message.topic.value.startswith(self._marker_filter[:-2]):
                    self.received.append((message.topic.value, bytes(message.payload)))  # type: ignore[arg-type]
        return list(self.received)

    @property
    def _marker_filter(self) -> str:
        return f"busway-test-marker/{self.client_id}/#"

    def _client(self, aiomqtt: object) -> object:
        return aiomqtt.Client(  # type: ignore[attr-defined]
            "127.0.0.1", self.broker.port, identifier=self.client_id, clean_session=False
        )
