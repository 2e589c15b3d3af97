"""Scaling: route hop throughput and CPU per message with 1, 2, 3 daemons and `--workers 1/2`.

Every setup runs real `busway run` processes on ONE config against ONE nats-server, in the same
run, so the figures compare. A setup:

1. fresh IN and OUT streams, IN preloaded with `--count` JSON messages (not timed);
2. the daemons start on a config *without* the route and are waited for ("busway ready");
3. the config file gains the route, and every daemon (or the supervisor, which forwards it to
   its workers) gets SIGHUP at once: each reload adds the route's consumer, shared by all;
4. timed from the SIGHUPs until OUT holds `--count` messages (every input routed and acked).

So no daemon gets a head start, and start-up is not counted. CPU is read from /proc (user +
system ticks) for the busway processes (daemons, supervisors and their workers) and for the
nats-server, over the timed part, and reported per message. The nats-server runs with
`sync_interval: always` (busway's embedded default) or nats-server's default (`--sync
default`); `--sync both` runs each.

    python benches/bench_scaling.py                       # sync always, 20k msgs, 1 round
    python benches/bench_scaling.py --sync both --count 30000 --rounds 2

Not a test: figures depend on the machine (quote them with its core count and load). The
CPU per message is the robust figure; the rate also measures what else the machine runs (the
"cores" columns say how much CPU each side actually got while timed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent))

import contextlib

from bench_hop import ROUTES, prepare, start_server

SETUPS = [("daemons", 1), ("daemons", 2), ("daemons", 3), ("workers", 1), ("workers", 2)]
_TICK = os.sysconf("SC_CLK_TCK")


def config_text(url: str, *, with_route: bool) -> str:
    route = f'\n[[routes]]\nname = "bench"\nfrom = "in.>"\nmax_in_flight = 4000\n{ROUTES["when"]}\n'
    return f"""pid_file = "busway.pid"

[nats]
servers = ["{url}"]
publish_window = 1000

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
{route if with_route else ""}"""


def cpu_seconds(pid: int) -> float:
    """User + system CPU of `pid` so far (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _TICK


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(p) for p in (task / "children").read_text().split()]
    return found


@dataclass
class Setup:
    mode: str
    n: int
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.n} daemon(s)" if self.mode == "daemons" else f"--workers {self.n}"

    def start(self, config: Path, directory: Path) -> None:
        count = self.n if self.mode == "daemons" else 1
        extra = [] if self.mode == "daemons" else ["--workers", str(self.n)]
        for i in range(count):
            log = directory / f"{self.mode}{self.n}-{i}.log"
            self.logs.append(log)
            with open(log, "wb") as out:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "busway", "run", str(config), *extra],
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        cwd=directory,
                    )
                )
        marker = "busway ready" if self.mode == "daemons" else "worker(s) (pids"
        deadline = time.monotonic() + 120
        while not all(marker in log.read_text() for log in self.logs):
            for process, log in zip(self.processes, self.logs, strict=True):
                if process.poll() is not None:
                    raise SystemExit(f"{self.label}: exited early:\n{log.read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{self.label}: not ready in 120s")
            time.sleep(0.05)

    def pids(self) -> list[int]:
        """The busway processes: daemons, or supervisors and their workers."""
        pids = [p.pid for p in self.processes]
        if self.mode == "workers":
            pids += [c for p in self.processes for c in children(p.pid)]
        return pids

    def stop(self) -> None:
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def watch_out(
    url: str, count: int, pids: list[int], server_pid: int
) -> tuple[float, int, dict[int, float], float, float]:
    """Poll OUT on one connection: (time of the first routed message, how many OUT held then,
    CPU of `pids` then, the nats-server's CPU then, time OUT held `count`)."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        first: tuple[float, int, dict[int, float], float] | None = None
        deadline = time.monotonic() + 600
        while True:
            stored = (await js.stream_info("OUT")).state.messages
            now = time.perf_counter()
            if first is None and stored:
                first = (
                    now,
                    stored,
                    {pid: cpu_seconds(pid) for pid in pids},
                    cpu_seconds(server_pid),
                )
            if stored >= count:
                assert first is not None
                return (*first, now)
            if time.monotonic() > deadline:
                raise SystemExit(f"OUT holds {stored} of {count} after 600s")
            await anyio.sleep(0.01)
    finally:
        await client.close()


def measure(
    setup: Setup, url: str, count: int, directory: Path, server_pid: int
) -> dict[str, float]:
    """Timed from the first routed message (reloading to add the route is not counted)."""
    config = directory / "busway.toml"
    config.write_text(config_text(url, with_route=False))
    anyio.run(prepare, url, count, 256, backend_options={"use_uvloop": True})
    try:
        setup.start(config, directory)
        pids = setup.pids()
        config.write_text(config_text(url, with_route=True))
        for process in setup.processes:
            process.send_signal(signal.SIGHUP)
        started, done_before, before, server_before, ended = anyio.run(
            watch_out, url, count, pids, server_pid
        )
        busway_cpu = sum(cpu_seconds(pid) - before[pid] for pid in pids)
        server_cpu = cpu_seconds(server_pid) - server_before
    finally:
        setup.stop()
    seconds = ended - started
    routed = count - done_before
    return {
        "msgs_per_s": routed / seconds,
        "busway_cpu_us": busway_cpu / routed * 1e6,
        "server_cpu_us": server_cpu / routed * 1e6,
        "busway_cores": busway_cpu / seconds,
        "server_cores": server_cpu / seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--sync", choices=["always", "default", "both"], default="always")
    args = parser.parse_args()
    # SIGTERM/SIGINT unwind through the `finally`s, so no daemon or server is left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    syncs = ["always", "default"] if args.sync == "both" else [args.sync]
    table: list[tuple[str, str, dict[str, float]]] = []
    for sync in syncs:
        with tempfile.TemporaryDirectory(prefix="busway-scaling-") as store:
            server, url = start_server(Path(store), sync)
            try:
                results: dict[str, list[dict[str, float]]] = {}
                for round_ in range(args.rounds):
                    for mode, n in SETUPS:
                        setup = Setup(mode, n)
                        directory = Path(store) / f"{mode}{n}-{round_}"
                        directory.mkdir()
                        figures = measure(setup, url, args.count, directory, server.pid)
                        results.setdefault(setup.label, []).append(figures)
                        print(
                            json.dumps({"sync": sync, "setup": setup.label, **figures}), flush=True
                        )
            finally:
                server.terminate()
                server.wait()
        for label, runs in results.items():
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            table.append((sync, label, median))
    cores = os.cpu_count()
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(
        f"\nroute hop, {args.count} x 256 B, one nats-server, {cores} CPU(s), "
        f"median of {args.rounds}, {time.strftime('%Y-%m-%d')}, load average at the end {load}"
    )
    print(
        f"{'sync':<8}{'setup':<14}{'msg/s':>9}{'busway CPU/msg':>16}{'server CPU/msg':>16}"
        f"{'busway cores':>14}{'server cores':>14}"
    )
    for sync, label, m in table:
        print(
            f"{sync:<8}{label:<14}{m['msgs_per_s']:>9,.0f}{m['busway_cpu_us']:>13.0f} us"
            f"{m['server_cpu_us']:>13.0f} us{m['busway_cores']:>14.2f}{m['server_cores']:>14.2f}"
        )


if __name__ == "__main__":
    main()
