"""What the fault scenarios share: the figures they print, RSS, stream reads.

The daemon to kill is `tests.support.Daemon`, shared with the other daemon tests.

Every scenario ends with `Figures(...).report()`: one line of what was sent, delivered, lost
and duplicated, printed (pytest shows it with `-s`, and in the summary of a failure) and
returned for the asserts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

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
