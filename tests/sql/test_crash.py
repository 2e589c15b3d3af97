"""`kill -9` of a daemon mid-flow: after a restart every row is in the stream exactly once.

One daemon runs both source modes against PostgreSQL: an incremental source over 12,000 rows
and an outbox of 3,000. It is killed while publishing; the restarted daemon re-reads from the
last stored watermark and re-claims the uncommitted outbox rows, and the stream's dedup drops
what the first one had already stored. The watermark-after-PubAck rule is tested per engine in
test_sources.py; this test adds the real crash, on one engine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import nats
import nats.js.errors
import orjson
import psycopg
import pytest

from tests.sql.engines import DEPLOY
from tests.sql.servers import PostgresServer
from tests.support import NatsServer, stream_messages

ROWS, OUTBOX = 12_000, 3_000


class Daemon:
    """`busway run CONFIG` as a child process, its output in a log file."""

    def __init__(self, config: Path) -> None:
        self.log = config.with_suffix(f".{time.monotonic_ns()}.log")
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "busway", "run", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> None:
        wait_for(lambda: "busway ready" in self.output() or self.process.poll() is not None,
                 "daemon ready", timeout)  # fmt: skip
        assert self.process.poll() is None, self.output()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    """Daemons a test started; any still running at the end are killed by pid."""
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.kill()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached in {timeout}s")
        time.sleep(0.05)


@pytest.mark.slow
def test_sigkill_mid_flow_then_restart_loses_and_duplicates_no_row(
    postgres_server: PostgresServer,
    nats_server: NatsServer,
    tmp_path: Path,
    unique: str,
    daemons: list[Daemon],
) -> None:
    feed, box, stream = f"crash_{unique}", f"crashbox_{unique}", f"CRASH_{unique}"
    with psycopg.connect(postgres_server.dsn, autocommit=True) as connection:
        connection.execute(f"CREATE TABLE {feed} (id bigint PRIMARY KEY, note text)")
        connection.execute(
            f"INSERT INTO {feed} SELECT i, 'row ' || i FROM generate_series(1, {ROWS}) AS i"
        )
        connection.execute(
            (DEPLOY / "outbox.postgres.sql").read_text().replace("busway_outbox", box)
        )
        connection.execute(
            f"INSERT INTO {box} (subject, payload) SELECT 'crash{unique}.box', "
            f"json_build_object('n', i) FROM generate_series(1, {OUTBOX}) AS i"
        )
    config = tmp_path / "crash.toml"
    config.write_text(
        f"""
[nats]
servers = ["{nats_server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "{stream}"
subjects = ["crash{unique}.>"]
duplicate_window = "10m"

[[sources]]
name = "feed{unique}"
type = "postgres"
dsn = "{postgres_server.dsn}"
table = "{feed}"
subject = "crash{unique}.feed"
batch_size = 200
interval = "100ms"

[[sources]]
name = "box{unique}"
type = "postgres"
mode = "outbox"
dsn = "{postgres_server.dsn}"
table = "{box}"
subject = "{{subject}}"
batch_size = 100
interval = "100ms"
"""
    )

    async def stored() -> int:
        client = await nats.connect(nats_server.url)
        try:
            return (await client.jetstream().stream_info(stream)).state.messages
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await client.close()

    first = Daemon(config)
    daemons.append(first)
    first.wait_ready()
    wait_for(lambda: anyio.run(stored) >= 2_000, "2,000 messages before the kill")
    first.kill()
    assert first.process.returncode == -signal.SIGKILL
    assert anyio.run(stored) < ROWS + OUTBOX, "the kill must land mid-flow"

    def outbox_empty() -> bool:
        with psycopg.connect(postgres_server.dsn) as connection:
            return connection.execute(f"SELECT count(*) FROM {box}").fetchone() == (0,)

    async def watermark() -> bytes | None:
        client = await nats.connect(nats_server.url)
        try:
            bucket = await client.jetstream().key_value("busway_state")
            return (await bucket.get(f"feed{unique}.watermark")).value
        except nats.js.errors.KeyNotFoundError:
            return None
        finally:
            await client.close()

    second = Daemon(config)
    daemons.append(second)
    second.wait_ready()
    wait_for(
        lambda: outbox_empty() and anyio.run(watermark) == f'[["int","{ROWS}"]]'.encode(),
        "every row published",
        timeout=120,
    )
    second.process.send_signal(signal.SIGTERM)
    assert second.process.wait(timeout=40) == 0, second.output()

    async def contents() -> list[tuple[str, int]]:
        client = await nats.connect(nats_server.url)
        try:
            return [
                (m.subject, orjson.loads(m.data).get("id") or orjson.loads(m.data)["n"])
                for m in await stream_messages(client, stream)
            ]
        finally:
            await client.close()

    found = anyio.run(contents)
    assert len(found) == ROWS + OUTBOX
    assert sorted(n for subject, n in found if subject.endswith(".feed")) == list(
        range(1, ROWS + 1)
    )
    assert sorted(n for subject, n in found if subject.endswith(".box")) == list(
        range(1, OUTBOX + 1)
    )
