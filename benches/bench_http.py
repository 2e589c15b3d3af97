"""HTTP adapters' throughput against raw baselines, same server, same run.

Ingest (requests/s, each answered only after its PubAck):

* raw:    uvicorn + Starlette (busway's own `Listener`) with one handler that does only
          `await js.publish(...)` with a `Nats-Msg-Id`, and answers 202;
* busway: a `Bus` with the `http` source (content checks, id, problem answers, metrics).

The load comes from a separate process (aiohttp, `--connections` keep-alive connections), so
the client does not share the server's event loop.

Sink (deliveries/s to a uvicorn + Starlette receiver in another process that answers 204):

* raw:    an aiohttp loop posting the same bodies, `--concurrency` at a time, no JetStream;
* busway: a `Bus` with the `http` sink draining a preloaded stream (pull, batch, concurrent
          POSTs, ack per batch), timed until its consumer has nothing pending or un-acked.

Runs alternate raw / busway; the median of each is printed with their ratio and the
nats-server sync mode (`always`: fsync before every PubAck, busway's embedded default).

    python benches/bench_http.py                     # sync always
    python benches/bench_http.py --sync default --requests 5000 --messages 10000
    python benches/bench_http.py --audit             # also busway ingest with [audit] enabled

`--audit` adds a third ingest variant each round, the same source with `[audit] enabled`: each
request then also sends its audit record (one pipelined publish, never waited for), so the
ratio of the two busway figures is the trail's cost on the ingress path.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import nats
import orjson
from anyio.abc import TaskStatus
from nats.js.api import StreamConfig
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hop import payload, start_server

from busway import Bus, default_registry
from busway._config.model import decode_config
from busway._ingress.listener import Listener

LOAD = textwrap.dedent(
    """
    import asyncio, sys, time, aiohttp, uvloop
    url, count, connections, body = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    async def main():
        data = body.encode()
        headers = {"content-type": "application/json"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as s:
            left = count
            async def worker():
                nonlocal left
                while left > 0:
                    left -= 1
                    async with s.post(url, data=data, headers=headers) as r:
                        await r.read()
                        assert r.status == 202, r.status
            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(connections)))
            print(count / (time.perf_counter() - start))
    uvloop.run(main())
    """
)

RECEIVER = textwrap.dedent(
    """
    import sys, uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    async def hook(request):
        await request.body()
        return Response(b"", status_code=204)
    app = Starlette(routes=[Route("/hook", hook, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False, http="httptools", loop="uvloop")
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_port(port: int) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            time.sleep(0.05)
        else:
            return
    raise TimeoutError(port)


async def fresh_stream(url: str, name: str, subject: str) -> None:
    client = await nats.connect(url)
    js = client.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream(name)
    await js.add_stream(StreamConfig(name=name, subjects=[subject]))
    await client.close()


async def load(url: str, count: int, connections: int, body: bytes) -> float:
    result = await anyio.run_process(
        [sys.executable, "-c", LOAD, url, str(count), str(connections), body.decode()]
    )
    return float(result.stdout.decode().strip())


def config_text(nats_url: str, body: str) -> str:
    return f"""
[nats]
servers = ["{nats_url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "IN"
subjects = ["in.>"]
create = false
{body}
"""


def decode(text: str) -> object:
    registry = default_registry()
    return decode_config(text, source_types=registry.source_config, sink_types=registry.sink_config)


async def ingest_busway(
    nats_url: str, count: int, connections: int, body: bytes, audit: bool = False
) -> float:
    await fresh_stream(nats_url, "IN", "in.>")
    trail = '[audit]\nenabled = true\nstream = "BENCH_AUDIT"\nsubject_prefix = "bench.audit"\n'
    source = f"""
{trail if audit else ""}
[[sources]]
name = "api"
type = "http"
path = "/ingest"
subject = "in.orders"
"""
    async with Bus(decode(config_text(nats_url, source))) as bus:  # type: ignore[arg-type]
        return await load(f"http://127.0.0.1:{bus.http_port}/ingest", count, connections, body)


@contextlib.asynccontextmanager
async def raw_ingest_server(nats_url: str) -> AsyncIterator[int]:
    client = await nats.connect(nats_url)
    js = client.jetstream()

    async def ingest(request: Request) -> Response:
        await js.publish(
            "in.orders", await request.body(), headers={"Nats-Msg-Id": uuid.uuid4().hex}
        )
        return Response(b"{}", status_code=202, media_type="application/json")

    listener = Listener(
        Starlette(routes=[Route("/ingest", ingest, methods=["POST"])]), "127.0.0.1:0"
    )

    async def run(*, task_status: TaskStatus[None]) -> None:
        await listener.run(task_status=task_status)

    async with anyio.create_task_group() as tg:
        await tg.start(run)
        try:
            yield listener.port
        finally:
            listener.stop()
    await client.close()


async def ingest_raw(nats_url: str, count: int, connections: int, body: bytes) -> float:
    await fresh_stream(nats_url, "IN", "in.>")
    async with raw_ingest_server(nats_url) as port:
        return await load(f"http://127.0.0.1:{port}/ingest", count, connections, body)


async def preload(nats_url: str, count: int, body: bytes) -> None:
    await fresh_stream(nats_url, "IN", "in.>")
    client = await nats.connect(nats_url)
    js = client.jetstream(publish_async_max_pending=1000)
    for i in range(count):
        await js.publish_async("in.orders", body, headers={"Nats-Msg-Id": f"m-{i}"})
    await js.publish_async_completed()
    await client.close()


async def sink_busway(nats_url: str, hook: str, count: int, concurrency: int, body: bytes) -> float:
    await preload(nats_url, count, body)
    sink = f"""
[[sinks]]
name = "hook"
type = "http"
from = "in.>"
url = "{hook}"
concurrency = {concurrency}
"""
    client = await nats.connect(nats_url)
    js = client.jetstream()
    start = time.perf_counter()
    async with Bus(decode(config_text(nats_url, sink))):  # type: ignore[arg-type]
        while True:
            info = await js.consumer_info("IN", "busway-sink-hook")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await anyio.sleep(0.01)
        elapsed = time.perf_counter() - start
    await client.close()
    return count / elapsed


async def sink_raw(hook: str, count: int, concurrency: int, body: bytes) -> float:
    import aiohttp

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        left = count

        async def worker() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                headers = {"Content-Type": "application/json", "Idempotency-Key": str(left)}
                async with session.post(hook, data=body, headers=headers) as response:
                    await response.read()
                    assert response.status == 204

        start = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker)
        return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sync", choices=["always", "default"], default="always")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--audit", action="store_true", help="also ingest with [audit] on")
    parser.add_argument("--ingest-only", action="store_true", help="skip the sink rounds")
    args = parser.parse_args()
    body = payload(1, args.size)
    with tempfile.TemporaryDirectory() as store:
        server, nats_url = start_server(Path(store), args.sync)
        port = free_port()
        receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
        try:
            wait_port(port)
            hook = f"http://127.0.0.1:{port}/hook"
            results: dict[str, list[float]] = {
                "ingest raw": [],
                "ingest busway": [],
                "ingest busway+audit": [],
                "sink raw": [],
                "sink busway": [],
            }

            async def rounds() -> None:
                for _ in range(args.rounds):
                    results["ingest raw"].append(
                        await ingest_raw(nats_url, args.requests, args.connections, body)
                    )
                    results["ingest busway"].append(
                        await ingest_busway(nats_url, args.requests, args.connections, body)
                    )
                    if args.audit:
                        results["ingest busway+audit"].append(
                            await ingest_busway(
                                nats_url, args.requests, args.connections, body, audit=True
                            )
                        )
                    if args.ingest_only:
                        continue
                    results["sink raw"].append(
                        await sink_raw(hook, args.messages, args.concurrency, body)
                    )
                    results["sink busway"].append(
                        await sink_busway(nats_url, hook, args.messages, args.concurrency, body)
                    )

            anyio.run(rounds, backend_options={"use_uvloop": True})
        finally:
            receiver.terminate()
            receiver.wait()
            server.terminate()
            server.wait()
    median = {name: statistics.median(values) for name, values in results.items() if values}
    print(
        f"\nnats sync={args.sync}; body {args.size} B; median of {args.rounds} rounds "
        f"(each: {', '.join(f'{v:,.0f}' for v in results['ingest busway'])} busway ingest)"
    )
    print(
        f"ingest: raw {median['ingest raw']:,.0f} req/s, busway {median['ingest busway']:,.0f} "
        f"req/s, ratio {median['ingest busway'] / median['ingest raw']:.2f} "
        f"({args.requests} requests over {args.connections} connections)"
    )
    if args.audit:
        audited = median["ingest busway+audit"]
        print(
            f"ingest with [audit]: busway {audited:,.0f} req/s, "
            f"ratio to busway without {audited / median['ingest busway']:.3f} "
            f"(each: {', '.join(f'{v:,.0f}' for v in results['ingest busway+audit'])})"
        )
    if not args.ingest_only:
        print(
            f"sink:   raw {median['sink raw']:,.0f} POST/s, busway {median['sink busway']:,.0f} "
            f"deliveries/s, ratio {median['sink busway'] / median['sink raw']:.2f} "
            f"({args.messages} messages, concurrency {args.concurrency})"
        )
    print(orjson.dumps({"sync": args.sync, **median}).decode())


if __name__ == "__main__":
    main()
