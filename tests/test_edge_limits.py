"""The listener against hostile clients: slow, idle, huge and many, on a real loopback socket.

Each test runs a real `Listener` with short limits, talks raw TCP to it (an HTTP client would
not misbehave on purpose), and waits on a condition with a deadline: the connection closed,
the refusal counted. How fast the limits act is a benchmark matter, not asserted here.
"""

from __future__ import annotations

import resource
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import msgspec
import orjson
import pytest
from anyio.abc import SocketStream
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from busway._config.model import HttpConfig
from busway._ingress.listener import Listener
from busway.routers.durations import decode_hook
from tests.http_support import running_listener
from tests.support import eventually

pytestmark = pytest.mark.anyio

DEADLINE = 20.0  # seconds any awaited condition may take on a loaded machine


async def echo_length(request: Request) -> JSONResponse:
    body = await request.body()
    return JSONResponse({"length": len(body)})


APP = Starlette(routes=[Route("/", echo_length, methods=["GET", "POST"])])


def limits(**overrides: Any) -> HttpConfig:
    """An `[http]` table as the config file would give it."""
    table = {"listen": "127.0.0.1:0", **overrides}
    return msgspec.convert(table, HttpConfig, dec_hook=decode_hook)


@asynccontextmanager
async def served(settings: HttpConfig) -> AsyncIterator[Listener]:
    async with running_listener(Listener(APP, "127.0.0.1:0", settings=settings)) as listener:
        yield listener


async def read_until_closed(stream: SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (fails after DEADLINE)."""
    received = bytearray()
    with anyio.fail_after(DEADLINE):
        while True:
            try:
                received += await stream.receive()
            except (anyio.EndOfStream, anyio.BrokenResourceError, ConnectionResetError):
                return bytes(received)


def problem_of(response: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"content-type: application/problem+json" in head
    assert b"connection: close" in head
    return status, orjson.loads(body)


@pytest.fixture
async def slow_limits() -> AsyncIterator[Listener]:
    settings = limits(header_timeout="1s", body_timeout="1s", body_min_rate=1000)
    async with served(settings) as listener:
        yield listener


async def test_headers_dribbled_slowly_are_answered_408_and_closed(
    slow_limits: Listener,
) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", slow_limits.port)
    async with stream:
        await stream.send(b"POST / HTTP/1.1\r\nHost: x\r\n")
        closed = anyio.Event()

        async def dribble() -> None:
            # A header line every 100 ms, for ever: each byte is "progress", none completes.
            n = 0
            while not closed.is_set():
                try:
                    await stream.send(b"X-%d: y\r\n" % n)
                except (anyio.BrokenResourceError, ConnectionResetError, BrokenPipeError):
                    return
                n += 1
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(dribble)
            response = await read_until_closed(stream)
            closed.set()
    assert problem_of(response) == (
        408,
        {
            "type": "urn:busway:problem:request-timeout",
            "title": "Request Timeout",
            "status": 408,
            "detail": "the request's headers did not arrive in time",
        },
    )
    assert slow_limits.stats.refused == {"header_timeout": 1}


async def test_a_connection_that_never_sends_a_request_is_closed(slow_limits: Listener) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", slow_limits.port)
    async with stream:
        response = await read_until_closed(stream)
    assert problem_of(response)[0] == 408
    assert slow_limits.stats.refused == {"header_timeout": 1}


async def test_a_body_dribbled_below_the_minimum_rate_is_answered_408_and_closed(
    slow_limits: Listener,
) -> None:
    stream = await anyio.connect_tcp("127.0.0.1", slow_limits.port)
    async with stream:
        await stream.send(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        closed = anyio.Event()

        async def dribble() -> None:
            # 10 bytes every 100 ms: 100 B/s against a minimum of 1000 B/s.
            while not closed.is_set():
                try:
                    await stream.send(b"0123456789")
                except (anyio.BrokenResourceError, ConnectionResetError, BrokenPipeError):
                    return
                await anyio.sleep(0.1)

        async with anyio.create_task_group() as tg:
            tg.start_soon(dribble)
            response = await read_until_closed(stream)
            closed.set()
    assert problem_of(response) == (
        408,
        {
            "type": "urn:busway:problem:request-timeout",
            "title": "Request Timeout",
            "status": 408,
            "detail": "the request's body arrived too slowly",
        },
    )
    assert slow_limits.stats.refused == {"body_timeout": 1}


async def test_a_body_at_a_fair_rate_is_read_whole(slow_limits: Listener) -> None:
    # 1 MB: it takes longer than body_timeout only if the machine is very slow, and then the
    # minimum rate (1000 B/s) still grants it a thousand seconds.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{slow_limits.port}") as http:
        response = await http.post("/", content=b"x" * 1_000_000)
    assert response.json() == {"length": 1_000_000}
    assert slow_limits.stats.refused == {}


async def test_a_48_mb_header_is_refused_with_431_long_before_it_is_sent_whole() -> None:
    async with served(limits()) as listener:
        peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        stream = await anyio.connect_tcp("127.0.0.1", listener.port)
        chunk = b"a" * 65536
        sent = 0
        async with stream:
            await stream.send(b"POST / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            with anyio.fail_after(DEADLINE):
                while sent < 48 * 1024 * 1024:
                    try:
                        await stream.send(chunk)
                    except (anyio.BrokenResourceError, ConnectionResetError, BrokenPipeError):
                        break
                    sent += len(chunk)
            response = await read_until_closed(stream)
        peak_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert listener.stats.refused == {"headers_too_large": 1}
        # The server stopped reading after the limit (32 KiB) plus a read or two: the client
        # was cut off far short of 48 MB, and the process never held the header.
        assert sent < 16 * 1024 * 1024
        assert peak_after - peak_before < 16 * 1024
        if response:  # the answer can be lost to a reset while the client still writes
            status, body = problem_of(response)
            assert status == 431
            assert body["detail"] == (
                "the request's headers exceed this server's limits of 32768 bytes and 100 fields"
            )


async def test_too_many_header_fields_get_431() -> None:
    async with served(limits(max_headers=10)) as listener:
        stream = await anyio.connect_tcp("127.0.0.1", listener.port)
        fields = b"".join(b"X-%d: y\r\n" % n for n in range(11))
        async with stream:
            await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
            response = await read_until_closed(stream)
        assert problem_of(response)[1] == {
            "type": "urn:busway:problem:headers-too-large",
            "title": "Request Header Fields Too Large",
            "status": 431,
            "detail": "the request's headers exceed this server's limits of 32768 bytes and "
            "10 fields",
        }
        assert listener.stats.refused == {"too_many_headers": 1}


async def test_idle_keep_alive_connections_are_closed_after_the_idle_timeout() -> None:
    async with served(limits(keepalive_timeout="500ms", header_timeout="60s")) as listener:
        streams = [await anyio.connect_tcp("127.0.0.1", listener.port) for _ in range(50)]
        try:
            for stream in streams:
                await stream.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            answers = []
            for stream in streams:
                answers.append(await read_until_closed(stream))
        finally:
            for stream in streams:
                await stream.aclose()
        # Each got its answer, kept alive, then closed by the server while idle.
        assert all(a.startswith(b"HTTP/1.1 200 OK") for a in answers)
        assert all(b"connection: close" not in a for a in answers)


async def test_past_max_connections_a_connection_gets_503_and_a_fresh_one_works_later() -> None:
    async with served(limits(max_connections=20, header_timeout="60s")) as listener:
        held = [await anyio.connect_tcp("127.0.0.1", listener.port) for _ in range(20)]
        try:

            async def open_connections() -> bool:
                return len(listener.stats.open_connections[0]) == 20

            await eventually(open_connections, DEADLINE)
            extra = await anyio.connect_tcp("127.0.0.1", listener.port)
            async with extra:
                refused = await read_until_closed(extra)
        finally:
            for stream in held:
                await stream.aclose()
        assert problem_of(refused) == (
            503,
            {
                "type": "urn:busway:problem:overloaded",
                "title": "Service Unavailable",
                "status": 503,
                "detail": "the server has too many open connections; retry after the "
                "Retry-After delay",
            },
        )
        assert b"retry-after: 1" in refused
        assert listener.stats.refused == {"too_many_connections": 1}
        # Once they are gone, a real request on a fresh connection is served.
        answers: list[httpx.Response] = []

        async def served_again() -> bool:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{listener.port}") as http:
                try:
                    answers.append(await http.post("/", content=b"hello"))
                except httpx.TransportError:
                    return False
            return answers[-1].status_code == 200

        await eventually(served_again, DEADLINE)
        assert answers[-1].json() == {"length": 5}


def test_a_max_connections_beyond_the_open_file_limit_is_a_startup_error() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit to exceed")
    listener = Listener(APP, "127.0.0.1:0", settings=limits(max_connections=hard))
    listener.bind()
    try:
        with pytest.raises(Exception, match=r"max_connections = \d+ does not fit"):
            listener._limits()
    finally:
        listener.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
