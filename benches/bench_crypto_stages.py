"""Throughput of a route with an `encrypt` stage vs the same route without, same server, same run.

Every shape drains the same preloaded stream of N JSON messages (256 bytes by default) through
a route that decodes, runs its stages, encodes and publishes (at-least-once: each input acked
after its output's PubAck):

* plain:  `stages = [{ remove = ["absent"] }]` (a no-op stage: the same decode/encode work);
* field:  plain + `encrypt` of one field (`pad`, the bulk of the body);
* body:   plain + `encrypt` of the whole body;
* verify: plain + `sign` (HMAC-SHA256) + `verify` of the same signature.

Shapes alternate within each round so drift on a noisy machine hits all of them; the median of
each is reported with its ratio to `plain`. Reuses bench_hop.py's server and stream set-up.

    python benches/bench_crypto_stages.py                   # 20k msgs, 3 rounds, sync always
    python benches/bench_crypto_stages.py --count 50000 --sync default
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hop import out_messages, prepare, start_server

from busway import Bus, default_registry
from busway._config.model import decode_config

_KEY = '[{ id = "k1", file = "aes.key" }]'
_SECRET = '[{ id = "h1", file = "hmac.secret" }]'
_BASE = '{ remove = ["absent"] }'
SHAPES = {
    "plain": f"stages = [{_BASE}]",
    "field": f'stages = [{_BASE}, {{ encrypt = {{ fields = ["pad"], keys = {_KEY} }} }}]',
    "body": f"stages = [{_BASE}, {{ encrypt = {{ keys = {_KEY} }} }}]",
    "verify": (
        f'stages = [{_BASE}, {{ sign = {{ algorithm = "hmac-sha256", field = "sig", keys = '
        f'{_SECRET} }} }}, {{ verify = {{ algorithm = "hmac-sha256", field = "sig", keys = '
        f"{_SECRET} }} }}]"
    ),
}


async def run_route(url: str, count: int, window: int, shape: str, keys: Path) -> float:
    """Seconds for the route of `shape` to drain `count` messages (outputs stored, acked)."""
    registry = default_registry()
    config = decode_config(
        f"""
[nats]
servers = ["{url}"]
publish_window = {window}

[http]
listen = ""

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
to = ["out.orders"]
max_in_flight = 4000
{SHAPES[shape]}
""",
        base_dir=str(keys),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]
        while not stats.received:  # noqa: ASYNC110 - a counter, no event
            await anyio.sleep(0.0005)
        started = time.perf_counter()
        while stats.published < count or stats.in_flight:  # noqa: ASYNC110 - a counter, no event
            await anyio.sleep(0.002)
        return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--window", type=int, default=1000, help="publish acks in flight")
    parser.add_argument("--sync", choices=["always", "default"], default="always")
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated")
    args = parser.parse_args()
    shapes = args.shapes.split(",")

    results: dict[str, list[float]] = {shape: [] for shape in shapes}
    with tempfile.TemporaryDirectory(prefix="busway-bench-") as store:
        keys = Path(store) / "keys"
        keys.mkdir()
        (keys / "aes.key").write_text(os.urandom(32).hex())
        (keys / "hmac.secret").write_text(os.urandom(32).hex())
        server, url = start_server(Path(store), args.sync)
        try:
            for round_ in range(args.rounds):
                for shape in shapes:
                    anyio.run(
                        prepare, url, args.count, args.size, backend_options={"use_uvloop": True}
                    )
                    seconds = anyio.run(
                        run_route,
                        url,
                        args.count,
                        args.window,
                        shape,
                        keys,
                        backend_options={"use_uvloop": True},
                    )
                    stored = anyio.run(out_messages, url)
                    assert stored == args.count, f"{shape}: OUT holds {stored}, not {args.count}"
                    rate = args.count / seconds
                    results[shape].append(rate)
                    print(
                        json.dumps(
                            {
                                "round": round_,
                                "shape": shape,
                                "sync": args.sync,
                                "count": args.count,
                                "size": args.size,
                                "msgs_per_s": round(rate),
                            }
                        ),
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait()
    medians = {shape: statistics.median(rates) for shape, rates in results.items()}
    base = medians.get("plain")
    print(
        f"\ncrypto stages, sync={args.sync}, {args.count} x {args.size} B, median of {args.rounds}:"
    )
    for shape, rate in medians.items():
        ratio = f", {rate / base:.2f} of plain" if base else ""
        print(f"  {shape:<7} {rate:>9,.0f} msg/s{ratio}")


if __name__ == "__main__":
    main()
