"""The price of the listener's limits and guard: requests/s and server CPU per request.

Two servers, each in its own process, answer `POST /ingest` (256-byte body, read whole,
answered 202, no JetStream: the listener is all that is measured):

* plain: uvicorn + httptools + the app, as the listener was before its limits;
* limits: busway's `Listener` without settings: the limits' protocol (defaults), no guard;
* edge:  busway's `Listener` with the default `[http]` limits (header size, count and time,
         body rate, max connections) and its guard (client address, the auth-failure bucket,
         401 watching).

`wrk` (`apt-get install -y wrk`) drives each for `--seconds` with `--connections` keep-alive
connections; the server's CPU time (user + system, from /proc) is read around each run.
Rounds alternate plain / edge; the medians are printed with their ratios.

    python benches/bench_edge.py --rounds 5 --seconds 10 --connections 32
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from busway._config.model import HttpConfig
from busway._ingress.listener import Listener

LUA = """
wrk.method = "POST"
wrk.body = string.rep("x", 256)
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["X-API-Key"] = "not-checked-here"
"""


async def ingest(request: Request) -> Response:
    await request.body()
    return Response(b'{"ok":true}', status_code=202, media_type="application/json")


APP = Starlette(routes=[Route("/ingest", ingest, methods=["POST"])])


async def serve(mode: str, port: int) -> None:
    """Run one server until killed."""
    if mode in ("edge", "limits"):
        settings = HttpConfig() if mode == "edge" else None  # None: the limits, no guard
        listener = Listener(APP, f"127.0.0.1:{port}", settings=settings)
        await listener.run()
        return
    config = uvicorn.Config(
        APP,
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        http="httptools",
        lifespan="off",
        server_header=False,
    )
    await uvicorn.Server(config).serve()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"server on {port} did not start")


def one_run(mode: str, args: argparse.Namespace, script: Path) -> tuple[float, float]:
    """(requests/s, server CPU µs per request) of one wrk run against a fresh server."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", mode, "--port", str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(port)
        before = cpu_seconds(server.pid)
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{args.connections}",
                f"-d{args.seconds}s",
                "-s",
                str(script),
                f"http://127.0.0.1:{port}/ingest",
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        cpu = cpu_seconds(server.pid) - before
    finally:
        server.terminate()
        server.wait(10)
    found = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if found is None or non2xx is not None:
        raise SystemExit(f"wrk run failed or got errors:\n{out}")
    requests = int(found.group(1))
    return requests / args.seconds, cpu / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--serve", choices=["plain", "limits", "edge"])
    parser.add_argument("--modes", default="plain,edge", help="e.g. plain,limits,edge")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    if args.serve:
        anyio.run(serve, args.serve, args.port, backend_options={"use_uvloop": True})
        return
    modes = args.modes.split(",")
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(LUA)
        for n in range(args.rounds):
            for mode in modes:
                rate, cpu = one_run(mode, args, script)
                results[mode].append((rate, cpu))
                print(f"round {n + 1} {mode:5}: {rate:8.0f} req/s  {cpu:6.1f} µs CPU/request")
    medians = {m: [statistics.median(x[i] for x in r) for i in (0, 1)] for m, r in results.items()}
    base = medians[modes[0]]
    for mode, (rate, cpu) in medians.items():
        print(
            f"median {mode:6}: {rate:8.0f} req/s {cpu:6.1f} µs CPU/req | ratio to {modes[0]}: "
            f"req/s {rate / base[0]:.2f}, CPU/req {cpu / base[1]:.2f}"
        )


if __name__ == "__main__":
    main()
