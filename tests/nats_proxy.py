"""A TCP proxy in front of nats-server that can lose a PubAck: the message is stored, the
client never hears so.

Once the client sends a publish to `subject` (a `PUB`/`HPUB` line naming it), the proxy holds
everything the server sends back, until `release()`. The publish itself reaches the server,
so JetStream stores it; only the confirmation is missing, as when a connection drops right
after a publish.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from anyio.abc import SocketStream


class PubAckHolder:
    """Forwards NATS traffic both ways; after a publish to `subject`, holds the replies."""

    def __init__(self, upstream_port: int, subject: str) -> None:
        self.upstream_port = upstream_port
        self.trigger = f"PUB {subject} ".encode()
        self.port = 0
        self.holding = anyio.Event()
        self._released = anyio.Event()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def release(self) -> None:
        """Forward what was held, and everything after it."""
        self._released.set()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[PubAckHolder]:
        """Listen on a free loopback port until the block exits."""
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        self.port = listener.extra(anyio.abc.SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, self._connection, tg)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()

    async def _connection(self, client: SocketStream) -> None:
        try:
            async with (
                client,
                await anyio.connect_tcp("127.0.0.1", self.upstream_port) as server,
                anyio.create_task_group() as tg,
            ):

                async def to_server() -> None:
                    await self._to_server(client, server)
                    tg.cancel_scope.cancel()  # the client left: so does the server side

                async def to_client() -> None:
                    await self._to_client(server, client, tg)
                    tg.cancel_scope.cancel()

                tg.start_soon(to_server)
                tg.start_soon(to_client)
        except* (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass  # one side hung up mid-send: the connection is over either way

    async def _to_server(self, client: SocketStream, server: SocketStream) -> None:
        tail = b""
        async for chunk in client:
            if not self._released.is_set() and self.trigger in tail + chunk:
                self.holding.set()  # before forwarding: the PubAck cannot slip through
            tail = chunk[-len(self.trigger) :]
            await server.send(chunk)

    async def _to_client(
        self, server: SocketStream, client: SocketStream, tg: anyio.abc.TaskGroup
    ) -> None:
        held: list[bytes] = []
        lock = anyio.Lock()  # one writer at a time, so the byte order is kept

        async def flush() -> None:
            for chunk in held:
                await client.send(chunk)
            held.clear()

        async def flush_on_release() -> None:
            await self._released.wait()
            async with lock:
                await flush()

        tg.start_soon(flush_on_release)
        async for chunk in server:
            async with lock:
                if self.holding.is_set() and not self._released.is_set():
                    held.append(chunk)
                    continue
                await flush()
                await client.send(chunk)
