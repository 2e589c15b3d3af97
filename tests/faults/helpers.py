"""What the fault scenarios share: the figures they print, a daemon to kill, RSS, stream reads.

Every scenario ends with `Figures(...).report()`: one line of what was sent, delivered, lost
and duplicated, printed (pytest shows it with `-s`, and in the summary of a failure) and
returned for the asserts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats
import nats.js.errors
from nats.aio.msg import Msg

from tests.support import stream_messages


@dataclass(frozen=True)
class Figures:
    """Outcome of a scenario: `sent` distinct messages against what arrived where it should."""

    scenario: str
    sent: int
    delivered: int
    lost: int
    duplicated: int
    extra: dict[str, object] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        scenario: str,
        sent: Iterable[Hashable],
        arrived: Iterable[Hashable],
        **extra: object,
    ) -> Figures:
        """Compare the keys sent with the keys that arrived (a key may arrive twice)."""
        expected = set(sent)
        counts = Counter(arrived)
        unexpected = set(counts) - expected
        if unexpected:
            extra = {**extra, "unexpected": len(unexpected)}
        return cls(
            scenario=scenario,
            sent=len(expected),
            delivered=sum(1 for key in counts if key in expected),
            lost=len(expected - set(counts)),
            duplicated=sum(count - 1 for count in counts.values()),
            extra=extra,
        )

    def report(self) -> Figures:
        """Print the figures on one line; returns self."""
        details = "".join(f" {name}={value}" for name, value in self.extra.items())
        print(
            f"\n[fault:{self.scenario}] sent={self.sent} delivered={self.delivered} "
            f"lost={self.lost} duplicated={self.duplicated}{details}",
            flush=True,
        )
        return self


def rss_mib() -> float:
    """Resident set size of this process now, in MiB (VmRSS from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS line in /proc/self/status")


class Daemon:
    """`busway run CONFIG` in a child process, its output appended to one log file.

    The log keeps every incarnation's output (a kill and restart appends), so a failure shows
    the whole history.
    """

    def __init__(self, config: Path, log: Path, env: Mapping[str, str] | None = None) -> None:
        self.config = config
        self.log = log
        self.env = dict(env or {})
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._offset = 0

    def start(self) -> None:
        """Start a new incarnation (the previous one must have exited)."""
        assert self.process is None or self.process.poll() is not None
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "busway", "run", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        self.starts += 1

    def output(self) -> str:
        """This incarnation's output so far."""
        with open(self.log, "rb") as log:
            log.seek(self._offset)
            return log.read().decode(errors="replace")

    async def wait_ready(self, timeout: float = 60) -> None:
        """Wait for the "busway ready" line; fail with the output if it exits or hangs."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while "busway ready" not in self.output():
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode}:\n{self.output()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready after {timeout}s:\n{self.output()}")
            await anyio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL this incarnation and reap it."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    async def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (a graceful stop) and wait for the exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"daemon did not stop in {timeout}s:\n{self.output()}")
            await anyio.sleep(0.05)
        return code


async def read_stream(url: str, stream: str) -> list[Msg]:
    """Every message of `stream` on the server at `url` ([] if the stream does not exist)."""
    client = await nats.connect(url)
    try:
        return await stream_messages(client, stream)
    except nats.js.errors.NotFoundError:
        return []
    finally:
        await client.close()


async def consumer_settled(url: str, stream: str, durable: str) -> bool:
    """True when the consumer has nothing pending and nothing awaiting an ack."""
    client = await nats.connect(url)
    try:
        info = await client.jetstream().consumer_info(stream, durable)
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await client.close()
    return bool(info.num_pending == 0 and info.num_ack_pending == 0)


def message_id(message: Msg) -> str:
    """The `Nats-Msg-Id` a message was stored with."""
    assert message.headers is not None and "Nats-Msg-Id" in message.headers, message
    return message.headers["Nats-Msg-Id"]
