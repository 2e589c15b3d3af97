"""Directory source throughput: a JSON-lines file into JetStream, busway vs a raw nats-py loop.

One file of N JSON lines (1M by default, ~100 bytes each) is published into JetStream twice
per round, against the same nats-server:

* raw:    a hand-written loop, `for line in file: await js.publish_async(subject, line)` with
          `publish_async_max_pending` = 1024, then `publish_async_completed()`: no JSON check,
          no headers, no message ids, no claim, no checkpoints;
* busway: a `Bus` with one `file` source (`format = "jsonl"`, `ready = "rename"`), timed from
          the rename of the file into the inbox to the file arriving in done/ (which happens
          after the last PubAck). Each line is validated as JSON and carries `Nats-Msg-Id`,
          `Busway-File`, `Busway-File-Line` and `Content-Type` headers.

Each run is its own Python process, so its peak RSS (`ru_maxrss`) is its own; both are
printed, with lines/s and the ratio busway/raw. The nats-server runs with nats-server's
default sync (flush every 2 minutes) unless `--sync always` (busway's embedded default);
every figure printed says which.

    python benches/bench_file_source.py                       # 1M lines, sync default, 1 round
    python benches/bench_file_source.py --count 200000 --sync always --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
from nats.js.api import StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benches.bench_hop import start_server


def make_file(path: Path, count: int) -> None:
    """`count` JSON lines of about 100 bytes each."""
    with open(path, "wb") as file:
        for i in range(count):
            file.write(
                b'{"id": %d, "kind": "order", "total": %d, "note": "%s"}\n'
                % (i, i % 977, b"x" * 40)
            )


def lines_of(path: Path) -> Iterator[bytes]:
    """The file's lines without their newline (blocking reads, as a naive loop does)."""
    with open(path, "rb", buffering=1024 * 1024) as file:
        for line in file:
            yield line.rstrip(b"\n")


def peak_rss_mib() -> float:
    """This process's peak resident set size so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run_raw(url: str, path: Path, stream: str) -> float:
    client = await nats.connect(url)
    js = client.jetstream(publish_async_max_pending=1024)
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
    subject = f"{stream.lower()}.lines"
    count = 0
    started = time.perf_counter()
    for line in lines_of(path):
        await js.publish_async(subject, line)
        count += 1
    await js.publish_async_completed()
    elapsed = time.perf_counter() - started
    stored = (await js.stream_info(stream)).state.messages
    await client.close()
    assert stored == count, (stored, count)
    return count / elapsed


async def run_busway(url: str, path: Path, stream: str, work: Path) -> float:
    from busway import Bus, default_registry
    from busway._config.model import decode_config
    from busway.adapters.file import FileSource

    inbox = work / f"inbox-{stream}"
    inbox.mkdir()
    registry = default_registry()
    config = decode_config(
        f"""
[nats]
servers = ["{url}"]
[http]
listen = "127.0.0.1:0"
[[streams]]
name = "{stream}"
subjects = ["{stream.lower()}.>"]
[[sources]]
name = "bench"
type = "file"
path = "{inbox}"
subject = "{stream.lower()}.lines"
ready = "rename"
""",
        base_dir=str(work),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    async with Bus(config) as bus:
        source = bus.plan.sources[0][1]
        assert isinstance(source, FileSource)
        started = time.perf_counter()
        os.link(path, inbox / "lines.jsonl")  # a complete file appears at once
        while source.files.done == 0:  # noqa: ASYNC110 - polling the counter is the measure
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        published = bus.metrics.stats[0].published
    client = await nats.connect(url)
    stored = (await client.jetstream().stream_info(stream)).state.messages
    await client.close()
    assert stored == published, (stored, published)
    return published / elapsed


def child(args: argparse.Namespace) -> None:
    """One measured run, in its own process; prints {"rate", "rss"} as JSON."""
    path = Path(args.file)
    if args.child == "raw":
        rate = anyio.run(run_raw, args.url, path, args.stream)
    else:
        rate = anyio.run(
            run_busway,
            args.url,
            path,
            args.stream,
            Path(args.work),
            backend_options={"use_uvloop": True},
        )
    print(json.dumps({"rate": rate, "rss": peak_rss_mib()}))


def measure(kind: str, url: str, path: Path, stream: str, work: Path) -> dict[str, float]:
    output = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--url",
            url,
            "--file",
            str(path),
            "--stream",
            stream,
            "--work",
            str(work),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sync", choices=["always", "default"], default="default")
    parser.add_argument("--child", choices=["raw", "busway"])
    parser.add_argument("--url")
    parser.add_argument("--file")
    parser.add_argument("--stream")
    parser.add_argument("--work")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory(prefix="bench-file-") as store:
        work = Path(store)
        server, url = start_server(work, args.sync)
        try:
            path = work / "lines.jsonl"
            make_file(path, args.count)
            size = path.stat().st_size
            results: dict[str, list[dict[str, float]]] = {"raw": [], "busway": []}
            for round_ in range(args.rounds):
                for kind in ("raw", "busway"):
                    result = measure(kind, url, path, f"BENCH_{kind.upper()}_{round_}", work)
                    results[kind].append(result)
                    print(
                        f"round {round_ + 1} {kind:>6}: {result['rate']:>9,.0f} lines/s, "
                        f"peak RSS {result['rss']:.0f} MiB",
                        flush=True,
                    )
        finally:
            server.terminate()
            server.wait()
    raw = statistics.median(r["rate"] for r in results["raw"])
    busway = statistics.median(r["rate"] for r in results["busway"])
    print(
        f"\n{args.count:,} JSON lines ({size / 2**20:.0f} MiB), nats-server sync={args.sync}, "
        f"median of {args.rounds}:\n"
        f"  raw publish_async loop: {raw:>9,.0f} lines/s, "
        f"peak RSS {max(r['rss'] for r in results['raw']):.0f} MiB\n"
        f"  busway file source:     {busway:>9,.0f} lines/s, "
        f"peak RSS {max(r['rss'] for r in results['busway']):.0f} MiB\n"
        f"  ratio busway/raw: {busway / raw:.2f}"
    )


if __name__ == "__main__":
    main()
