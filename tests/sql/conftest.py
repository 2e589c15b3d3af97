"""Session fixtures: a throwaway PostgreSQL 15 cluster and MariaDB server, and SQLite files.

Each server starts once per session on a free loopback port with its data in a temporary
directory and is stopped by the fixture at the end. MariaDB comes from Debian's
`mariadb-server` package; without it its tests are skipped, except under CI (`CI` or
`BUSWAY_REQUIRE_DATABASES` set, as `.ci/run` does), where a missing server fails them.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.sql.engines import Engine, MariaDBEngine, PostgresEngine, SqliteEngine
from tests.sql.servers import MariaDBServer, PostgresServer, mariadb_available


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL 15 cluster."""
    server = PostgresServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    """The session's MariaDB server, with an empty `busway` database."""
    if not mariadb_available():
        message = "mariadbd not installed: apt-get install -y mariadb-server"
        if os.environ.get("CI") or os.environ.get("BUSWAY_REQUIRE_DATABASES"):
            pytest.fail(message)
        pytest.skip(message)
    server = MariaDBServer()
    server.create_database("busway")
    yield server
    server.close()


@pytest.fixture(params=["postgres", "mariadb", "sqlite"])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Engine]:
    """Each database engine in turn, with a test-side connection to it."""
    if request.param == "postgres":
        found: Engine = PostgresEngine(request.getfixturevalue("postgres_server"))
    elif request.param == "mariadb":
        found = MariaDBEngine(request.getfixturevalue("mariadb_server"))
    else:
        found = SqliteEngine(tmp_path / "test.db")
    await found.connect()
    yield found
    await found.close()


@pytest.fixture
async def postgres(postgres_server: PostgresServer) -> AsyncIterator[PostgresEngine]:
    """PostgreSQL only, with a test-side connection."""
    found = PostgresEngine(postgres_server)
    await found.connect()
    yield found
    await found.close()


@pytest.fixture
async def mariadb(mariadb_server: MariaDBServer) -> AsyncIterator[MariaDBEngine]:
    """MariaDB only, with a test-side connection."""
    found = MariaDBEngine(mariadb_server)
    await found.connect()
    yield found
    await found.close()
