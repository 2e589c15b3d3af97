"""The session's RabbitMQ node (Debian's rabbitmq-server, free loopback ports, temporary data).

Without the package the AMQP tests are skipped, except under CI (`CI` or
`BUSWAY_REQUIRE_DATABASES` set, as `.ci/run` does), where a missing server fails them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.amqp.servers import RabbitServer, rabbitmq_available


def require_rabbitmq() -> None:
    """Skip the test without rabbitmq-server (fail it under CI)."""
    if not rabbitmq_available():
        message = "rabbitmq-server not installed: apt-get install -y rabbitmq-server"
        if os.environ.get("CI") or os.environ.get("BUSWAY_REQUIRE_DATABASES"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def rabbit_server() -> Iterator[RabbitServer]:
    """One RabbitMQ node for the whole session (it takes ~10 s to boot)."""
    require_rabbitmq()
    server = RabbitServer()
    yield server
    server.close()
