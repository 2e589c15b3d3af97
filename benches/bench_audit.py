"""What the `[audit]` trail adds to one ingress: serial publishes with and without the trail.

A source's publish waits for its PubAck; with `[audit]` it then also sends the audit record
(one pipelined publish, never waited for). Published one at a time, each publish costs about
one PubAck round trip, so a trail that waited for its own PubAck would double it, and one that
does not adds only the send. Both variants run against the same nats-server, alternating
rounds, through busway's own publisher (`JetStreamPublisher`) and the one sources get with
`[audit]` on (`ObservedPublisher`).

    python benches/bench_audit.py                    # sync default, 5000 publishes x 7 rounds
    python benches/bench_audit.py --sync always
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hop import start_server

from busway._config.model import AuditConfig, StreamConfig
from busway._ingress.observed import ObservedPublisher
from busway._nats.jetstream import JetStreamPublisher, ensure_stream, jetstream
from busway._observe.audit import AuditTrail
from busway._observe.metrics import ComponentStats


async def publish_serially(url: str, count: int, audited: bool, round_: int) -> float:
    """Microseconds per publish, `count` publishes one after the other."""
    client = await nats.connect(url)
    try:
        js = jetstream(client, window=1000)
        audit = AuditConfig(enabled=True, stream="AUDIT", subject_prefix="audit")
        await ensure_stream(js, StreamConfig(name="IN", subjects=["in.>"]))
        await ensure_stream(js, StreamConfig(name="AUDIT", subjects=["audit.>"]))
        publisher = JetStreamPublisher(js, timeout=5.0)
        stats = ComponentStats("api", "source")
        source = (
            ObservedPublisher(
                publisher,
                source="api",
                stats=stats,
                audit=AuditTrail(js, audit),
                dead_letter_prefix="busway.deadletter",
            )
            if audited
            else publisher
        )
        body = b'{"id": 1, "total": 250}'
        started = time.perf_counter()
        for i in range(count):
            headers = {"Nats-Msg-Id": f"r{round_}-{audited}-{i}", "Busway-Principal": "acme"}
            await source.publish("in.orders", body, headers=headers)
        elapsed = time.perf_counter() - started
        assert not stats.errors, stats.errors
        return elapsed / count * 1e6
    finally:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--sync", choices=["always", "default"], default="default")
    args = parser.parse_args()
    results: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="busway-bench-") as store:
        server, url = start_server(Path(store), args.sync)
        try:
            for round_ in range(args.rounds):
                for audited in (False, True):
                    results[audited].append(
                        anyio.run(publish_serially, url, args.count, audited, round_)
                    )
        finally:
            server.terminate()
            server.wait()
    plain = statistics.median(results[False])
    audited = statistics.median(results[True])
    pairs = ", ".join(f"{b / a:.2f}" for a, b in zip(results[False], results[True], strict=True))
    print(
        f"serial publish, sync={args.sync}, median of {args.rounds} x {args.count}: "
        f"without [audit] {plain:.0f} µs, with {audited:.0f} µs, ratio {audited / plain:.2f} "
        f"(per round: {pairs})"
    )


if __name__ == "__main__":
    main()
