"""SFTP throughput, busway vs a hand-written asyncssh loop doing the same work, same run.

Against one OpenSSH server (tests/sftp_support.py: sshd on a free loopback port) and one
nats-server:

* sink, raw:    one asyncssh session; per message: open `.<id>.tmp`, write, fsync, close,
                rename to `<id>` (the work the sink does, minus the existence check);
* sink, busway: `SftpSink.write` on batches of 256 (one session per batch, an existence check
                per file for idempotence, a temporary name, fsync, rename).
* source, raw:    download the file, `js.publish_async` each line (1024 pending), await all;
* source, busway: a Bus with one `sftp` source (`stable_for = "0s"`), timed from the file's
                rename into the polled directory to its arrival in done/ (after every PubAck);
                each line is JSON-checked and carries a `Nats-Msg-Id` and file headers.

Rounds alternate raw and busway; medians are printed with the ratio busway/raw.

    python benches/bench_sftp.py                          # 2000 files, 200k lines, 3 rounds
    python benches/bench_sftp.py --files 500 --lines 50000 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import anyio
import asyncssh
import nats
from nats.js.api import StreamConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benches.bench_hop import start_server
from busway import BuildContext, Bus, Message, default_registry
from busway._config.model import decode_config
from busway.adapters.sftp import SftpSink, SftpSource
from tests.sftp_support import SshServer

BATCH = 256


def body(i: int) -> bytes:
    return b'{"id": %d, "kind": "invoice", "note": "%s"}' % (i, b"x" * 60)


def server_table(sshd: SshServer) -> str:
    return sshd.server_table()


async def connect(sshd: SshServer) -> asyncssh.SSHClientConnection:
    return await asyncssh.connect(
        "127.0.0.1",
        sshd.port,
        username=sshd.user,
        client_keys=[str(sshd.client_key)],
        known_hosts=str(sshd.known_hosts),
    )


def files_in(folder: Path) -> int:
    return len(list(folder.iterdir()))


async def sink_raw(sshd: SshServer, folder: Path, count: int) -> float:
    folder.mkdir()  # noqa: ASYNC240 - set-up, before the clock starts
    async with await connect(sshd) as connection, connection.start_sftp_client() as sftp:
        started = time.perf_counter()
        for i in range(count):
            temporary, target = f"{folder}/.m{i}.tmp", f"{folder}/m{i}"
            async with sftp.open(temporary, "wb") as remote:
                await remote.write(body(i))
                await remote.fsync()
            await sftp.rename(temporary, target)
        return count / (time.perf_counter() - started)


async def sink_busway(sshd: SshServer, folder: Path, count: int, work: Path) -> float:
    registry = default_registry()
    config = decode_config(
        f'[[streams]]\nname = "S"\nsubjects = ["s.>"]\n[[sinks]]\nname = "bench"\n'
        f'type = "sftp"\nfrom = "s.>"\npath = "{folder}"\n{server_table(sshd)}\n',
        base_dir=str(work),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    sink = SftpSink(config.sinks[0], BuildContext(base_dir=work))  # type: ignore[arg-type]
    await sink.open()
    messages = [
        Message(
            subject="s.x", data=body(i), headers={}, id=f"m{i}", stream="S", sequence=i, attempt=1
        )
        for i in range(count)
    ]
    started = time.perf_counter()
    for first in range(0, count, BATCH):
        await sink.write(messages[first : first + BATCH])
    elapsed = time.perf_counter() - started
    await sink.close()
    assert files_in(folder) == count
    return count / elapsed


def make_file(path: Path, lines: int) -> None:
    with open(path, "wb") as file:
        for i in range(lines):
            file.write(body(i) + b"\n")


async def source_raw(sshd: SshServer, url: str, remote: Path, stream: str) -> float:
    client = await nats.connect(url)
    js = client.jetstream(publish_async_max_pending=1024)
    await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream.lower()}.>"]))
    count = 0
    started = time.perf_counter()
    async with await connect(sshd) as connection, connection.start_sftp_client() as sftp:
        with tempfile.TemporaryDirectory() as spool:
            local = Path(spool) / "file"
            await sftp.get(str(remote), str(local))
            with open(local, "rb") as file:  # noqa: ASYNC230 - the naive loop reads blocking
                for line in file:
                    await js.publish_async(f"{stream.lower()}.lines", line.rstrip(b"\n"))
                    count += 1
    await js.publish_async_completed()
    elapsed = time.perf_counter() - started
    await client.close()
    return count / elapsed


async def source_busway(
    sshd: SshServer, url: str, made: Path, inbox: Path, stream: str, work: Path
) -> float:
    registry = default_registry()
    config = decode_config(
        f'[nats]\nservers = ["{url}"]\n[http]\nlisten = "127.0.0.1:0"\n'
        f'[[streams]]\nname = "{stream}"\nsubjects = ["{stream.lower()}.>"]\n'
        f'[[sources]]\nname = "bench"\ntype = "sftp"\nsubject = "{stream.lower()}.lines"\n'
        f'path = "{inbox}"\nstable_for = "0s"\ninterval = "50ms"\n{server_table(sshd)}\n',
        base_dir=str(work),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    async with Bus(config) as bus:
        source = bus.plan.sources[0][1]
        assert isinstance(source, SftpSource)
        started = time.perf_counter()
        made.rename(inbox / "lines.jsonl")  # noqa: ASYNC240 - one rename: the file appears
        while source.published_files == 0:  # noqa: ASYNC110 - polling the counter is the measure
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - started
        published = bus.metrics.stats[0].published
    return published / elapsed


async def main_async(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-sftp-"))
    sshd = SshServer(work / "sshd")
    process, url = start_server(work, args.sync)
    results: dict[str, list[float]] = {
        k: [] for k in ("sink_raw", "sink_busway", "src_raw", "src_busway")
    }
    try:
        for round_ in range(args.rounds):
            results["sink_raw"].append(await sink_raw(sshd, sshd.root / f"r{round_}", args.files))
            results["sink_busway"].append(
                await sink_busway(sshd, sshd.root / f"b{round_}", args.files, work)
            )
            remote = sshd.root / f"lines{round_}.jsonl"
            make_file(remote, args.lines)
            results["src_raw"].append(await source_raw(sshd, url, remote, f"RAW{round_}"))
            inbox = sshd.root / f"inbox{round_}"
            inbox.mkdir()
            results["src_busway"].append(
                await source_busway(sshd, url, remote, inbox, f"BUS{round_}", work)
            )
    finally:
        sshd.stop()
        process.terminate()
        process.wait()
    medians = {k: statistics.median(v) for k, v in results.items()}
    print(
        json.dumps(
            {
                "files": args.files,
                "lines": args.lines,
                "rounds": args.rounds,
                "sync": args.sync,
                "sink_files_per_s": {
                    "raw": round(medians["sink_raw"]),
                    "busway": round(medians["sink_busway"]),
                    "ratio": round(medians["sink_busway"] / medians["sink_raw"], 2),
                },
                "source_lines_per_s": {
                    "raw": round(medians["src_raw"]),
                    "busway": round(medians["src_busway"]),
                    "ratio": round(medians["src_busway"] / medians["src_raw"], 2),
                },
            },
            indent=2,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sync", choices=["default", "always"], default="default")
    anyio.run(main_async, parser.parse_args())


if __name__ == "__main__":
    main()
