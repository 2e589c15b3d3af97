"""`busway run --workers N`: N supervised worker processes on one config and one host.

Each test runs the real CLI (`busway run --workers 2`) with its embedded nats-server, posts
over real HTTP (one connection per request, so the kernel spreads them over the workers'
SO_REUSEPORT sockets) and reads what a per-message file sink wrote: the sink's path holds
`{daemon}`, which each worker sets to `<host>-w<N>`, so the files say which worker did what.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway._cli.supervisor import parse_workers
from tests.configs import config_toml, stream_table
from tests.files_support import drop, jsonl, messages_of, names, source_config
from tests.support import Daemon, Daemons, NatsServer, eventually, wait_for

WORKERS_READY = re.compile(r"busway ready: (\d+) worker\(s\)")


def workers_config(tmp_path: Path, unique: str, *, http: str = "127.0.0.1:0") -> Path:
    """HTTP source -> IN -> route -> OUT -> per-message file sink under `out/<daemon>/`."""
    text = config_toml(
        None,
        data_dir=tmp_path / "nats",
        http=http,
        streams=[
            stream_table(f"IN_{unique}", f"in{unique}.>"),
            stream_table(f"OUT_{unique}", f"out{unique}.>"),
        ],
        top={"pid_file": str(tmp_path / "busway.pid")},
        body=f"""
[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"

[[routes]]
name = "r{unique}"
from = "in{unique}.>"
to = ["out{unique}.orders"]

[[sinks]]
name = "files{unique}"
type = "file"
from = "out{unique}.>"
mode = "per-message"
path = "out/{{daemon}}/{{id}}.json"
""",
    )
    path = tmp_path / "busway.toml"
    path.write_text(text)
    return path


def ready_count(daemon: Daemon) -> int:
    """How many times the supervisor announced the whole set ready."""
    return len(WORKERS_READY.findall(daemon.output()))


def worker_pid(daemon: Daemon, index: int) -> int:
    """The pid of worker `index`'s latest incarnation, from the supervisor's log."""
    found = re.findall(rf"worker {index} started \(pid (\d+)\)", daemon.output())
    assert found, daemon.output()
    return int(found[-1])


def post(url: str, n: int) -> None:
    """POST order `n` on a new connection until it is accepted (a request that reached a
    worker just killed gets no 202 and is sent again, as any client would)."""
    deadline = time.monotonic() + 60
    last = ""
    while True:
        try:
            response = httpx.post(url, json={"n": n}, timeout=10)
            if response.status_code == 202:
                return
            last = f"{response.status_code} {response.text}"
        except httpx.TransportError as exc:
            last = repr(exc)
        assert time.monotonic() < deadline, f"order {n} was never accepted: {last}"
        time.sleep(0.05)


def written(out: Path) -> dict[str, list[int]]:
    """Per worker directory (`<host>-wN`), the order numbers of the files it wrote."""
    found: dict[str, list[int]] = {}
    for path in out.glob("*/*.json"):
        with open(path, "rb") as file:
            found.setdefault(path.parent.name, []).append(orjson.loads(file.read())["n"])
    return found


def all_orders(out: Path) -> set[int]:
    return {n for numbers in written(out).values() for n in numbers}


def workers_counting(url: str) -> set[str]:
    """The workers whose HTTP source `api` counted requests, in one scrape of `/metrics`."""
    text = httpx.get(url, timeout=10).text
    series = (
        r'^busway_messages_received_total\{component="api",kind="source",worker="(\d+)"\} (\S+)$'
    )
    return {label for label, value in re.findall(series, text, re.M) if float(value) > 0}


@pytest.fixture
def workers_daemon(tmp_path: Path, unique: str, daemons: Daemons) -> Daemon:
    daemon = daemons.start(workers_config(tmp_path, unique), "--workers", "2")
    wait_for(lambda: ready_count(daemon) == 1 or daemon.process.poll() is not None, "ready", 90)
    assert ready_count(daemon) == 1, daemon.output()
    return daemon


def test_two_workers_share_the_consumers_and_the_http_port(
    workers_daemon: Daemon, tmp_path: Path
) -> None:
    daemon = workers_daemon
    base = daemon.http_url
    out = tmp_path / "out"
    for n in range(300):
        post(f"{base}/orders", n)
    wait_for(lambda: len(all_orders(out)) == 300, "300 orders written", 60)

    by_worker = written(out)
    host = socket.gethostname()
    assert sorted(by_worker) == [f"{host}-w1", f"{host}-w2"], "one worker did everything"
    assert sorted(n for numbers in by_worker.values() for n in numbers) == list(range(300))

    # Both workers took HTTP requests: their /metrics series (labelled by worker) counted
    # some. A scrape reaches one worker, so scrape until both have answered.
    seen: set[str] = set()
    wait_for(
        lambda: seen.update(workers_counting(f"{base}/metrics")) or seen == {"1", "2"},
        "both workers counting HTTP requests",
    )
    # Any worker answers /readyz for the set.
    assert httpx.get(f"{base}/readyz").json()["checks"]["workers"] is True


def test_a_killed_worker_is_restarted_and_nothing_is_lost(
    workers_daemon: Daemon, tmp_path: Path
) -> None:
    daemon = workers_daemon
    base = daemon.http_url
    out = tmp_path / "out"
    for n in range(100):
        post(f"{base}/orders", n)
    victim = worker_pid(daemon, 1)
    os.kill(victim, signal.SIGKILL)
    # The surviving worker answers for the set: not ready while worker 1 restarts (at least
    # the 1 s back-off), yet alive (the supervisor is mending it; a restart would not help).
    reasons: list[str] = []

    def set_not_ready() -> bool:
        response = httpx.get(f"{base}/readyz", timeout=10)
        if response.status_code == 503:
            reasons.append(response.json()["reasons"].get("workers", ""))
        return bool(reasons)

    wait_for(set_not_ready, "/readyz 503 while worker 1 restarts", 10)
    assert reasons[0].startswith(
        "1 of 2 workers running: worker 1 restarting (was killed by SIGKILL)"
    )
    assert httpx.get(f"{base}/healthz", timeout=10).status_code == 200
    for n in range(100, 300):  # while worker 1 is dead and while it restarts
        post(f"{base}/orders", n)
    wait_for(lambda: ready_count(daemon) == 1 and worker_pid(daemon, 1) != victim, "restart", 60)
    wait_for(lambda: "[w1] busway: busway ready" in daemon.output().split(str(victim))[-1], "w1")
    for n in range(300, 400):
        post(f"{base}/orders", n)
    # At-least-once: a message worker 1 held when it died is redelivered to a worker (after
    # ack_wait), so it may be written twice; none may be missing.
    wait_for(lambda: all_orders(out) == set(range(400)), "all 400 orders written", 90)
    assert "worker 1 (pid" in daemon.output() and "was killed by SIGKILL" in daemon.output()
    wait_for(lambda: httpx.get(f"{base}/readyz", timeout=10).status_code == 200, "set ready")
    assert daemon.process is not None and daemon.process.poll() is None


def test_sigterm_drains_every_worker_and_exits_0(workers_daemon: Daemon, tmp_path: Path) -> None:
    daemon = workers_daemon
    for n in range(50):
        post(f"{daemon.http_url}/orders", n)
    assert daemon.terminate() == 0, daemon.output()
    output = daemon.output()
    assert re.search(r"worker 1 \(pid \d+\) exited with code 0", output), output
    assert re.search(r"worker 2 \(pid \d+\) exited with code 0", output), output
    assert "embedded nats-server stopped" in output
    assert "Traceback" not in output
    assert not (tmp_path / "busway.pid").exists()


def test_reload_reaches_every_worker(workers_daemon: Daemon, tmp_path: Path) -> None:
    reload = subprocess.run(
        [sys.executable, "-m", "busway", "reload", str(workers_daemon.config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert reload.returncode == 0, reload.stderr + workers_daemon.output()
    assert "(all 2 workers)" in reload.stdout
    assert workers_daemon.output().count("SIGHUP: reloading") == 2


def test_a_port_in_use_is_one_line_and_exit_2_before_any_worker_starts(
    tmp_path: Path, unique: str, daemons: Daemons
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = workers_config(tmp_path, unique, http=f"127.0.0.1:{port}")
        daemon = daemons.start(config, "--workers", "2")
        assert daemon.process is not None
        assert daemon.process.wait(timeout=60) == 2
    output = daemon.output()
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1, output
    assert f"cannot listen on 127.0.0.1:{port} ([http] listen)" in errors[0]
    assert "worker 1 started" not in output
    assert "Traceback" not in output


def test_workers_auto_is_one_per_cpu_and_bad_counts_are_refused() -> None:
    assert parse_workers("auto") == (os.cpu_count() or 1)
    assert parse_workers("3") == 3
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(ValueError, match="--workers expects a number from 1 to 1024"):
            parse_workers(bad)


@pytest.mark.anyio
async def test_workers_on_one_inbox_publish_every_file_once_on_an_external_server(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path, daemons: Daemons
) -> None:
    """A directory source is claimed file by file (rename + lock), so N workers on one inbox
    publish each record once, as N daemons do; with `[nats] servers` no server is embedded."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "busway.toml"
    config.write_text(
        f'pid_file = "{tmp_path / "busway.pid"}"\n'
        + source_config(nats_server, unique, inbox, options='stable_for = "50ms"')
    )
    daemon = daemons.start(config, "--workers", "2")
    await eventually(lambda: _ready_async(daemon), timeout=90)
    files, lines = 30, 20
    for n in range(files):
        drop(inbox / f"part{n:03}.jsonl", jsonl(lines, start=n * lines))

    async def all_done() -> bool:
        return len(names(inbox / "done")) == files

    await eventually(all_done, timeout=60)
    found = await messages_of(nc, f"IN_{unique}")
    assert sorted(orjson.loads(m.data)["n"] for m in found) == list(range(files * lines))
    assert "embedded nats-server" not in daemon.output()
    assert await daemon.stop() == 0


async def _ready_async(daemon: Daemon) -> bool:
    assert daemon.process is not None
    assert daemon.process.poll() is None, daemon.output()
    return ready_count(daemon) == 1
