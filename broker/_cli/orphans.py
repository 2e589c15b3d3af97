"""`busway status --orphans`: durable consumers on busway's streams that no component uses.

A route or sink removed from the config (or renamed) leaves its durable consumer behind: it
keeps every message it has not acknowledged, and on a stream with a `limits` retention it
costs nothing else, but it shows as backlog in monitoring forever. busway never deletes one
itself: another daemon may still run an older config that uses it. This lists them, read-only,
with the command that deletes one once no daemon uses it any more.
"""

from __future__ import annotations

import sys

import anyio

from busway._cli.dlq import _connected, _Unreachable
from busway._config.model import Config
from busway._errors import StartupError
from busway._nats.cluster import ConsumerSummary, durable_consumers

__all__ = ["orphaned_consumers", "print_orphans"]

_PREFIXES = ("busway-route-", "busway-sink-")


def orphaned_consumers(config: Config, consumers: list[ConsumerSummary]) -> list[ConsumerSummary]:
    """The busway consumers (`busway-route-*`, `busway-sink-*`) `config` does not declare."""
    used: set[str] = set()
    for route in config.routes:
        stream = config.consumed_stream(route) if route.partitioned else None
        if stream is not None and stream.partition is not None:  # one consumer per partition
            used |= {f"busway-route-{route.name}-p{i}" for i in range(stream.partition.count)}
        else:
            used.add(f"busway-route-{route.name}")
    used |= {f"busway-sink-{sink.name}" for sink in config.sinks}
    return [c for c in consumers if c.name.startswith(_PREFIXES) and c.name not in used]


def print_orphans(config: Config) -> int:
    """List the orphaned consumers of `config`'s streams; 0 when done, 1 if NATS fails."""
    try:
        orphans = anyio.run(_orphans, config, backend="asyncio")
    except (_Unreachable, StartupError) as exc:
        print(f"busway: {exc}", file=sys.stderr)
        return 1
    if not orphans:
        print("no orphaned consumers: every busway consumer on these streams is in the config")
        return 0
    print(f"{'STREAM':<24} {'CONSUMER':<40} {'PENDING':>9} {'ACK PENDING':>11}")
    for c in orphans:
        print(f"{c.stream:<24} {c.name:<40} {c.pending:>9} {c.ack_pending:>11}")
    print(
        "\nno route or sink of this config uses these. Once no daemon runs an older config "
        "that does, delete each with: nats consumer rm <STREAM> <CONSUMER>"
    )
    return 0


async def _orphans(config: Config) -> list[ConsumerSummary]:
    streams = [stream.name for stream in config.streams] + [config.dead_letter.stream]
    async with _connected(config) as client:
        return orphaned_consumers(config, await durable_consumers(client, streams))
