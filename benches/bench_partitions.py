"""Throughput of keyed partitions: 1, 4, 16 partitions, 1 and 2 daemons, both sync modes.

Each shape runs `busway run` daemons (subprocesses) on one config: a route from a partitioned
stream (`partition = { count = P }`, keys spread over 256 subject tokens) to an output stream,
`partitioned = true`, `max_in_flight = 1` (strict per-key order). Once every partition runs
somewhere, N messages are published (pipelined) and the rate is taken from the output stream's
own timestamps: (N - 1) / (last stored - first stored), so daemon start-up and the publisher's
head start do not count. Two unpartitioned baselines on 1 daemon: `max_in_flight = 1` (what
strict order costs without partitions) and `max_in_flight = 1024` (no order at all).

Not a test: figures depend on the machine. Quote them with the command line.

    python benches/bench_partitions.py                    # 4000 msgs, 3 rounds, both sync modes
    python benches/bench_partitions.py --count 10000 --sync default
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hop import start_server

KEYS = 256


def config_text(url: str, name: str, partitions: int, max_in_flight: int) -> str:
    partitioned = partitions > 0
    partition = f"partition = {{ count = {partitions} }}\n" if partitioned else ""
    route_keys = 'partitioned = true\npartition_lease_ttl = "2s"\n' if partitioned else ""
    return f"""
shutdown_timeout = "5s"
[nats]
servers = ["{url}"]
[http]
listen = ""
[[streams]]
name = "IN_{name}"
subjects = ["in{name}.*"]
{partition}
[[streams]]
name = "OUT_{name}"
subjects = ["out{name}.>"]

[[routes]]
name = "r{name}"
from = "in{name}.*"
to = ["out{name}.x"]
max_in_flight = {max_in_flight}
{route_keys}"""


def start_daemon(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "busway", "run", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )


def running_on(log_text: str) -> int:
    """Partitions a daemon runs now, by its log."""
    return log_text.count("running here") - log_text.count("handed back")


async def wait_until(check: object, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"{what}: not reached in {timeout}s")
        await asyncio.sleep(0.1)


async def run_shape(
    url: str, work: Path, name: str, partitions: int, daemons: int, max_in_flight: int, count: int
) -> float:
    config = work / f"{name}.toml"
    config.write_text(config_text(url, name, partitions, max_in_flight))
    logs = [work / f"{name}.{i}.log" for i in range(daemons)]
    processes = [start_daemon(config, log) for log in logs]
    client = await nats.connect(url)
    js = client.jetstream()
    try:

        async def ready() -> bool:
            texts = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
            if not all("busway ready" in text for text in texts):
                return False
            if partitions == 0:
                return True
            fair = sorted(
                partitions // daemons + (i < partitions % daemons) for i in range(daemons)
            )
            return sorted(running_on(text) for text in texts) == fair

        await wait_until(ready, f"{name}: daemons ready")
        window: list[asyncio.Future[object]] = []
        for i in range(count):
            body = orjson.dumps({"key": i % KEYS, "n": i, "pad": "x" * 200})
            window.append(await js.publish_async(f"in{name}.k{i % KEYS}", body))
            if len(window) >= 512:
                await asyncio.gather(*window)
                window.clear()
        await asyncio.gather(*window)

        async def drained() -> bool:
            return int((await js.stream_info(f"OUT_{name}")).state.messages) >= count

        await wait_until(drained, f"{name}: outputs stored", timeout=600)
        first = await js.get_msg(f"OUT_{name}", seq=1)
        last = await js.get_msg(f"OUT_{name}", seq=count)
        return (count - 1) / max(1e-6, _stored_at(last) - _stored_at(first))
    finally:
        await client.close()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _stored_at(message: object) -> float:
    """The time JetStream stored a message (its `time` from the direct get)."""
    stamp = getattr(message, "time", None)
    if isinstance(stamp, datetime.datetime):
        return stamp.timestamp()
    headers = getattr(message, "headers", None) or {}
    raw = headers.get("Nats-Time-Stamp")
    if raw is None:
        raise SystemExit("the stored message has no timestamp")
    return datetime.datetime.fromisoformat(raw.replace("Z", "+00:00")).timestamp()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--sync", choices=["default", "always", "both"], default="both")
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()
    syncs = ["default", "always"] if args.sync == "both" else [args.sync]
    shapes = [
        ("unpartitioned, max_in_flight 1024 (no order)", 0, 1, 1024),
        ("unpartitioned, max_in_flight 1 (stream order)", 0, 1, 1),
        *((f"{p} partition(s), {d} daemon(s)", p, d, 1) for p in (1, 4, 16) for d in (1, 2)),
    ]
    print(
        f"{args.count} messages of ~250 bytes over {KEYS} keys; msgs/s at the output, "
        f"median of {args.rounds} round(s) (shapes alternate within a round)"
    )
    for sync in syncs:
        with tempfile.TemporaryDirectory(prefix="busway-bench-partitions-") as tmp:
            work = Path(tmp)
            (work / "nats").mkdir()
            server, url = start_server(work / "nats", sync)
            rates: dict[str, list[float]] = {label: [] for label, *_ in shapes}
            try:
                for round_ in range(args.rounds):
                    for index, (label, partitions, daemons, max_in_flight) in enumerate(shapes):
                        name = f"b{round_}x{index}"
                        rates[label].append(
                            asyncio.run(
                                run_shape(
                                    url, work, name, partitions, daemons, max_in_flight, args.count
                                )
                            )
                        )
            finally:
                server.terminate()
                server.wait()
            for label, runs in rates.items():
                runs_text = " ".join(f"{rate:.0f}" for rate in runs)
                print(
                    f"sync {sync:7}  {label:48} {statistics.median(runs):7.0f} msg/s ({runs_text})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
