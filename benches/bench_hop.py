"""Hop throughput: a busway route vs a hand-written nats-py hop, same server, same run.

Both hops drain the same preloaded stream of N JSON messages (256 bytes by default) through
the same logic — a 3-clause predicate and a 4-field mapping — and publish to an output stream,
acking each input only after its output's PubAck (at-least-once):

* raw:    `raw_hop.py`, the baseline we measured peers with (continuous pull on an inbox,
          `publish_async` with a bounded window, in-order acker), with the predicate and
          mapping written by hand in Python;
* busway: a `Bus` with one route whose `when` and `transform` are JMESPath, compiled.

The busway hop is timed from the first message it takes (the raw hop from its consumer's
creation, a few ms earlier), so the bus's own start-up is not counted. Runs alternate raw /
busway so drift on a noisy machine hits both; the median of each is
reported with their ratio. The nats-server runs with `sync_interval: always` (busway's embedded
default: on disk before a PubAck) or with nats-server's default (`--sync default`: flushed
every 2 minutes); every figure printed says which.

    python benches/bench_hop.py                      # sync always, 50k msgs, 3 rounds
    python benches/bench_hop.py --sync default --count 100000
    python benches/bench_hop.py --route switch       # a switch stage + transform instead
    python benches/bench_hop.py --tracing off,1%     # [tracing] off vs 1 % sampling, same run

`--tracing` lists the busway variants to run each round: `off` (no `[tracing]`), or a sample
ratio such as `1%` / `100%` (`[tracing] enabled`, spans handed to an exporter that drops
them, so the figure is busway's own cost, not a collector's). When any ratio is listed, every
input carries a `traceparent` as an ingress would stamp it (sampled with that ratio; `off`
gets unsampled ones), so the variants differ only by the tracing code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import nats
import orjson
from nats.js.api import StorageType, StreamConfig
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

sys.path.insert(0, str(Path(__file__).resolve().parent))

from raw_hop import run_raw_hop

from busway import Bus, default_registry
from busway._config.model import decode_config
from busway._nats.embedded import find_nats_server

WHEN = "id >= `0` && kind == 'order' && ts >= `0`"
TRANSFORM = "{id: id, kind: kind, ts: ts, size: length(pad)}"
SWITCH = (
    f'{{ switch = {{ cases = [{{ when = "{WHEN}", to = ["out.orders"] }}], '
    'default = ["out.other"] } }'
)

#: The busway route of each shape; both do the work of the raw hop's hand-written logic
#: (a predicate decides where the message goes, a mapping reshapes it).
ROUTES = {
    "when": f'when = "{WHEN}"\ntransform = "{TRANSFORM}"\nto = ["out.orders"]',
    "switch": f'stages = [\n  {SWITCH},\n  {{ transform = "{TRANSFORM}" }},\n]',
}


def payload(i: int, size: int) -> bytes:
    """A JSON order `{"id","ts","kind","pad"}` padded to exactly `size` bytes."""
    base = orjson.dumps({"id": i, "ts": i, "kind": "order", "pad": ""})
    return orjson.dumps({"id": i, "ts": i, "kind": "order", "pad": "x" * max(0, size - len(base))})


def start_server(store: Path, sync: str) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sync_line = "\n  sync_interval: always" if sync == "always" else ""
    config = store / "nats.conf"
    config.write_text(
        f'listen: "127.0.0.1:{port}"\njetstream {{\n  store_dir: "{store / "js"}"{sync_line}\n}}\n'
    )
    process = subprocess.Popen(
        [find_nats_server(), "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"nats://127.0.0.1:{port}"


def traceparent(ratio: float) -> str:
    """A new trace's `traceparent`, sampled with probability `ratio` (as an ingress does)."""
    flags = "01" if random.random() < ratio else "00"
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-{flags}"


async def prepare(url: str, count: int, size: int, traced: float | None = None) -> None:
    """Fresh IN and OUT streams, IN preloaded with `count` messages (not timed); with
    `traced`, each carries a `traceparent` sampled with that ratio."""
    client = await nats.connect(url)
    js = client.jetstream(publish_async_max_pending=1000)
    for name, subject in (("IN", "in.>"), ("OUT", "out.>")):
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await js.delete_stream(name)
        await js.add_stream(
            StreamConfig(
                name=name, subjects=[subject], storage=StorageType.FILE, duplicate_window=120
            )
        )
    for i in range(count):
        headers = {"traceparent": traceparent(traced)} if traced is not None else None
        await js.publish_async("in.orders", payload(i, size), headers=headers)
    await js.publish_async_completed()
    await client.close()


async def out_messages(url: str) -> int:
    client = await nats.connect(url)
    try:
        return (await client.jetstream().stream_info("OUT")).state.messages
    finally:
        await client.close()


class DroppingExporter(SpanExporter):
    """Takes finished spans and drops them: the bench measures busway, not a collector."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def ratio_of(mode: str) -> float | None:
    """`off` -> None; `1%` -> 0.01."""
    return None if mode == "off" else float(mode.rstrip("%")) / 100


async def run_busway_hop(
    url: str, count: int, window: int, shape: str, tracing: float | None = None
) -> tuple[float, float]:
    """(seconds, CPU seconds of this process) for a busway route to drain `count` messages
    (all outputs stored, inputs acked), both timed from the first message taken."""
    registry = default_registry()
    traced = f"[tracing]\nenabled = true\nsample_ratio = {tracing}\n" if tracing is not None else ""
    config = decode_config(
        f"""
[nats]
servers = ["{url}"]
publish_window = {window}

[http]
listen = ""

{traced}
[[streams]]
name = "IN"
subjects = ["in.>"]
duplicate_window = "2m"

[[streams]]
name = "OUT"
subjects = ["out.>"]
duplicate_window = "2m"

[[routes]]
name = "bench"
from = "in.>"
max_in_flight = 4000
{ROUTES[shape]}
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, span_exporter=DroppingExporter() if tracing is not None else None)
    async with bus:
        # Timed from the first message taken, like the raw hop (timed from its consumer):
        # the bus's own start-up (streams, consumers) is not part of the hop.
        stats = bus.metrics.stats[0]
        while not stats.received:  # noqa: ASYNC110 - a counter, no event
            await anyio.sleep(0.0005)
        started, cpu = time.perf_counter(), time.process_time()
        while stats.published < count or stats.in_flight:  # noqa: ASYNC110 - a counter, no event
            await anyio.sleep(0.002)
        return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000, help="publish acks in flight")
    parser.add_argument("--sync", choices=["always", "default"], default="always")
    parser.add_argument(
        "--pin", action="store_true", help="pin nats-server and the hops to separate CPUs"
    )
    parser.add_argument(
        "--route",
        choices=sorted(ROUTES),
        default="when",
        help="busway route shape: `when` + `transform`, or a `switch` stage + `transform`",
    )
    parser.add_argument(
        "--tracing",
        default="off",
        help="busway variants, comma-separated: off, or a sample ratio such as 1%% or 100%%",
    )
    args = parser.parse_args()
    modes = [mode.strip() for mode in args.tracing.split(",")]
    any_traced = any(ratio_of(mode) is not None for mode in modes)
    impls = ["raw", *(f"busway tracing={mode}" for mode in modes)]
    results: dict[str, list[float]] = {impl: [] for impl in impls}
    # CPU seconds of this process per message: less swayed than msg/s by other load on the
    # machine (a busy neighbour slows a hop down but does not make it burn more CPU).
    cpu_per_message: dict[str, list[float]] = {impl: [] for impl in impls}
    with tempfile.TemporaryDirectory(prefix="busway-bench-") as store:
        server, url = start_server(Path(store), args.sync)
        if args.pin:
            # nats-server on the last CPU, the hops on the first: on a small machine this
            # keeps the two from trading places mid-run, the main source of round-to-round
            # noise.
            last = max(os.sched_getaffinity(0))
            os.sched_setaffinity(server.pid, {last})
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        try:
            for round_ in range(args.rounds):
                for impl in impls:
                    ratio = ratio_of(impl.rpartition("=")[2]) if impl != "raw" else None
                    anyio.run(
                        prepare,
                        url,
                        args.count,
                        args.size,
                        (ratio or 0.0) if any_traced else None,
                        backend_options={"use_uvloop": True},
                    )
                    if impl == "raw":
                        cpu_before = time.process_time()  # the raw hop's own connect included
                        seconds = anyio.run(
                            run_raw_hop,
                            url,
                            args.count,
                            args.window,
                            WHEN_PY,
                            TRANSFORM_PY,
                            backend_options={"use_uvloop": True},
                        )
                        cpu = time.process_time() - cpu_before
                    else:
                        seconds, cpu = anyio.run(
                            run_busway_hop,
                            url,
                            args.count,
                            args.window,
                            args.route,
                            ratio,
                            backend_options={"use_uvloop": True},
                        )
                    stored = anyio.run(out_messages, url)
                    assert stored == args.count, f"{impl}: OUT holds {stored}, not {args.count}"
                    rate = args.count / seconds
                    results[impl].append(rate)
                    cpu_per_message[impl].append(cpu / args.count * 1e6)
                    print(
                        json.dumps(
                            {
                                "round": round_,
                                "impl": impl,
                                "sync": args.sync,
                                "route": args.route,
                                "count": args.count,
                                "size": args.size,
                                "msgs_per_s": round(rate),
                                "cpu_us_per_msg": round(cpu / args.count * 1e6, 1),
                            }
                        ),
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait()
    raw = statistics.median(results["raw"])
    print(
        f"\nhop ({args.route} route), sync={args.sync}, {args.count} x {args.size} B, "
        f"median of {args.rounds}{', inputs with traceparent' if any_traced else ''}: "
        f"raw nats-py {raw:,.0f} msg/s, {statistics.median(cpu_per_message['raw']):.1f} us CPU/msg"
    )
    first = statistics.median(results[impls[1]])
    for impl in impls[1:]:
        ours = statistics.median(results[impl])
        cpu = statistics.median(cpu_per_message[impl])
        print(
            f"  {impl}: {ours:,.0f} msg/s, ratio to raw {ours / raw:.2f}, "
            f"to {impls[1]} {ours / first:.3f}; {cpu:.1f} us CPU/msg, CPU ratio to raw "
            f"{cpu / statistics.median(cpu_per_message['raw']):.2f}"
        )


def WHEN_PY(doc: dict[str, object]) -> bool:
    """`WHEN` written by hand."""
    return doc["id"] >= 0 and doc["kind"] == "order" and doc["ts"] >= 0  # type: ignore[operator]


def TRANSFORM_PY(doc: dict[str, object]) -> dict[str, object]:
    """`TRANSFORM` written by hand."""
    return {"id": doc["id"], "kind": doc["kind"], "ts": doc["ts"], "size": len(doc["pad"])}  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
