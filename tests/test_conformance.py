"""The adapter conformance suite (`busway.testing.conformance`) run against every built-in adapter.

Each class below only says how to configure one adapter and how to read its target back; the
checks come from the base class, the same ones a third-party adapter runs. Targets are real:
files in a temporary directory, an HTTP receiver on a loopback port, SQLite files, and the
PostgreSQL 15 / MariaDB servers of tests/sql (MariaDB skipped locally when it is not
installed, failing under CI as the other SQL tests do).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import orjson
import pytest
from starlette.responses import Response

from busway import RetryableError, default_registry
from busway.adapters.sql.sqlite import SqliteDatabase
from busway.testing import Harness, MemoryHub, MemorySink, MemorySinkConfig, memory_adapter
from busway.testing.conformance import SinkCase, SinkConformance, SourceCase, SourceConformance
from tests.amqp.client import rabbit
from tests.amqp.conftest import rabbit_server
from tests.amqp.servers import RabbitServer
from tests.http_support import Receiver, Seen, serving
from tests.mqtt.broker import MosquittoBroker, Subscriber
from tests.mqtt.conftest import mosquitto
from tests.sftp_support import SshServer
from tests.smtp_support import MailServer
from tests.sql.conftest import mariadb_server, postgres_server
from tests.sql.engines import Engine, MariaDBEngine, PostgresEngine
from tests.sql.servers import MariaDBServer, PostgresServer
from tests.support import free_port

# The database servers of tests/sql serve the SQL classes here too (each started only when a
# test here asks for it); exported so that the fixtures' names count as used.
__all__ = ["mariadb_server", "mosquitto", "postgres_server", "rabbit_server"]


def _keys_in_lines(text: str) -> list[str]:
    return [orjson.loads(line)["key"] for line in text.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------- memory sink


@dataclass
class _EveryMemorySink(MemoryHub):
    """Keeps every memory sink built, so a case can read them all (a restart builds anew)."""

    built: list[MemorySink] = field(default_factory=list)

    def create_sink(self, config: MemorySinkConfig, context: object) -> MemorySink:
        sink = super().create_sink(config, context)  # type: ignore[arg-type]
        self.built.append(sink)
        return sink


class TestMemorySink(SinkConformance):
    """busway.testing's own sink: delivers in memory, records duplicates (not idempotent)."""

    @pytest.fixture
    def sink_case(self, tmp_path: Path) -> SinkCase:
        hub = _EveryMemorySink()

        async def delivered() -> list[str]:
            return [orjson.loads(m.data)["key"] for sink in hub.built for m in sink.messages]

        return SinkCase(
            type="memory",
            table="",
            delivered=delivered,
            base_dir=tmp_path,
            adapter=memory_adapter(hub),
            idempotent=False,
        )


# ----------------------------------------------------------------------------------- file sinks


class TestFileAppendSink(SinkConformance):
    @pytest.fixture
    def sink_case(self, tmp_path: Path) -> SinkCase:
        (tmp_path / "blocker").write_text("a file where a directory should be\n")

        async def delivered() -> list[str]:
            found: list[str] = []
            for path in sorted((tmp_path / "out").glob("*.jsonl")):
                found += _keys_in_lines(path.read_text())
            return found

        return SinkCase(
            type="file",
            table='path = "out/lines.jsonl"',
            delivered=delivered,
            base_dir=tmp_path,
            bad_payload=b"not JSON",
            unreachable_table='path = "blocker/lines.jsonl"',
        )


class TestFilePerMessageSink(SinkConformance):
    @pytest.fixture
    def sink_case(self, tmp_path: Path) -> SinkCase:
        (tmp_path / "blocker").write_text("a file where a directory should be\n")

        async def delivered() -> list[str]:
            return [
                orjson.loads(path.read_bytes())["key"]
                for path in sorted((tmp_path / "out").glob("*.json"))
            ]

        return SinkCase(
            type="file",
            table='mode = "per-message"\npath = "out/{body[key]}.json"',
            delivered=delivered,
            base_dir=tmp_path,
            bad_payload=b'{"no_key_here": 1}',  # its file cannot be named
            unreachable_table='mode = "per-message"\npath = "blocker/{body[key]}.json"',
        )


# ------------------------------------------------------------------------------------ http sink


def _refuse_marked(seen: Seen) -> Response:
    status = 422 if b'"refuse"' in seen.body else 200
    return Response(b"", status_code=status)


class TestHttpSink(SinkConformance):
    """Idempotency over HTTP is the receiver's, on the `Idempotency-Key` the sink sends: the
    receiver here handles each key once, as a careful webhook handler does."""

    @pytest.fixture
    async def sink_case(self, tmp_path: Path) -> AsyncIterator[SinkCase]:
        receiver = Receiver(respond=_refuse_marked)

        async def delivered() -> list[str]:
            keys: list[str] = []
            for key in receiver.handled:  # each Idempotency-Key answered 2xx, once
                bodies = {
                    orjson.loads(seen.body)["key"]
                    for seen in receiver.seen
                    if seen.headers.get("idempotency-key") == key and b'"refuse"' not in seen.body
                }
                assert bodies == {key}, f"Idempotency-Key {key} is not its message's id"
                keys.append(key)
            return keys

        async with serving(receiver.app()) as url:
            yield SinkCase(
                type="http",
                table=f'url = "{url}/hook"',
                delivered=delivered,
                base_dir=tmp_path,
                bad_payload=b'{"refuse": true}',
                unreachable_table=f'url = "http://127.0.0.1:{free_port()}/hook"',
            )


# ------------------------------------------------------------------------------------ SQL sinks

_SINK_KEYS = 'columns = {{ item = "key" }}\nkey = ["item"]\ntable = "{table}"'
"""The sink's keys: the message's `key` field into column `item` (`key` is reserved in MySQL)."""


class TestSqliteSink(SinkConformance):
    @pytest.fixture
    def sink_case(self, tmp_path: Path) -> SinkCase:
        database = tmp_path / "sink.db"
        with sqlite3.connect(database) as connection:
            connection.execute("CREATE TABLE rows (item TEXT PRIMARY KEY NOT NULL)")
        connection.close()

        async def delivered() -> list[str]:
            with sqlite3.connect(database) as reader:
                found = [row[0] for row in reader.execute("SELECT item FROM rows")]
            reader.close()
            return found

        return SinkCase(
            type="sqlite",
            table=f'path = "{database}"\n' + _SINK_KEYS.format(table="rows"),
            delivered=delivered,
            base_dir=tmp_path,
            bad_payload=b'{"no_key_here": 1}',  # NULL into NOT NULL: refused by the database
            unreachable_table=f'path = "{tmp_path}/no/such/dir/sink.db"\n'
            + _SINK_KEYS.format(table="rows"),
        )


async def _server_sink_case(engine: Engine, tmp_path: Path) -> SinkCase:
    table = f"conformance_{uuid.uuid4().hex[:8]}"
    await engine.execute(f"CREATE TABLE {table} (item VARCHAR(100) PRIMARY KEY NOT NULL)")

    async def delivered() -> list[str]:
        return [str(row[0]) for row in await engine.fetch(f"SELECT item FROM {table}")]

    unreachable = engine.config().replace(
        engine.config().split("@", 1)[-1].split("/", 1)[0], f"127.0.0.1:{free_port()}"
    )
    return SinkCase(
        type=engine.type,
        table=engine.config() + "\n" + _SINK_KEYS.format(table=table),
        delivered=delivered,
        base_dir=tmp_path,
        bad_payload=b'{"no_key_here": 1}',
        unreachable_table=unreachable + "\n" + _SINK_KEYS.format(table=table),
    )


class TestPostgresSink(SinkConformance):
    @pytest.fixture
    async def sink_case(
        self, postgres_server: PostgresServer, tmp_path: Path
    ) -> AsyncIterator[SinkCase]:
        engine = PostgresEngine(postgres_server)
        await engine.connect()
        try:
            yield await _server_sink_case(engine, tmp_path)
        finally:
            await engine.close()


class TestMariaDBSink(SinkConformance):
    @pytest.fixture
    async def sink_case(
        self, mariadb_server: MariaDBServer, tmp_path: Path
    ) -> AsyncIterator[SinkCase]:
        engine = MariaDBEngine(mariadb_server)
        await engine.connect()
        try:
            yield await _server_sink_case(engine, tmp_path)
        finally:
            await engine.close()


# ---------------------------------------------------------------------------------- file source


class TestFileSource(SourceConformance):
    @pytest.fixture
    def source_case(self, tmp_path: Path) -> SourceCase:
        inbox = tmp_path / "inbox"

        async def feed(harness: Harness, keys: list[str]) -> None:
            lines = b"".join(orjson.dumps({"key": key}) + b"\n" for key in keys)
            staging = tmp_path / "staging.part"
            staging.write_bytes(lines)
            staging.rename(inbox / f"{keys[0]}.jsonl")  # appears whole

        async def refeed(harness: Harness, keys: list[str]) -> None:
            # The same file (same inode, size, mtime) back in the inbox, as a crash before
            # `done/` would leave it.
            done = inbox / "done" / f"{keys[0]}.jsonl"
            done.rename(inbox / done.name)

        return SourceCase(
            type="file",
            table='path = "inbox"\npatterns = ["*.jsonl"]\nstable_for = "100ms"\nrescan = "1h"',
            feed=feed,
            refeed=refeed,
            directory=tmp_path,
        )


# ----------------------------------------------------------------------------------- SQL source


class TestSqliteSource(SourceConformance):
    @pytest.fixture
    def source_case(self, tmp_path: Path) -> SourceCase:
        database = tmp_path / "source.db"
        with sqlite3.connect(database) as connection:
            connection.execute("CREATE TABLE events (id INTEGER PRIMARY KEY, key TEXT NOT NULL)")
        connection.close()

        async def feed(harness: Harness, keys: list[str]) -> None:
            with sqlite3.connect(database) as writer:
                writer.executemany("INSERT INTO events (key) VALUES (?)", [(k,) for k in keys])
            writer.close()

        async def rows_stay(harness: Harness, keys: list[str]) -> None:
            """The rows are still there: the source meets them again with its watermark gone."""

        return SourceCase(
            type="sqlite",
            table=f'path = "{database}"\ntable = "events"\ninterval = "100ms"',
            feed=feed,
            refeed=rows_stay,
            directory=tmp_path,
        )


class TestPostgresOutboxSource(SourceConformance):
    """The outbox mode: rows are deleted once published; the same rows inserted again (same
    ids, as a crash before the delete would leave them) store nothing new."""

    @pytest.fixture
    async def source_case(
        self, postgres_server: PostgresServer, tmp_path: Path
    ) -> AsyncIterator[SourceCase]:
        engine = PostgresEngine(postgres_server)
        await engine.connect()
        table = f"outbox_{uuid.uuid4().hex[:8]}"
        await engine.create_outbox(table)
        ids: dict[str, int] = {}

        async def feed(harness: Harness, keys: list[str]) -> None:
            for key in keys:
                ids.setdefault(key, len(ids) + 1)
            await engine.executemany(
                f"INSERT INTO {table} (id, subject, payload) OVERRIDING SYSTEM VALUE "
                "VALUES (%s, %s, %s)",
                [(ids[key], "conformance.in", orjson.dumps({"key": key}).decode()) for key in keys],
            )

        async def consumed(harness: Harness, keys: list[str]) -> bool:
            return not await engine.fetch(f"SELECT id FROM {table}")

        try:
            yield SourceCase(
                type="postgres",
                table=f'{engine.config()}\nmode = "outbox"\ntable = "{table}"\ninterval = "100ms"',
                feed=feed,
                consumed=consumed,
                directory=tmp_path,
            )
        finally:
            await engine.close()


# ---------------------------------------------------------------------------------- http source


class TestHttpSource(SourceConformance):
    @pytest.fixture
    def source_case(self, tmp_path: Path) -> SourceCase:
        async def post(harness: Harness, keys: list[str]) -> None:
            async with httpx.AsyncClient(base_url=harness.http_url) as client:
                for key in keys:
                    answer = await client.post(
                        "/conformance",
                        json={"key": key},
                        headers={"Idempotency-Key": key},
                    )
                    assert answer.status_code == 202, answer.text

        async def answered(harness: Harness, keys: list[str]) -> bool:
            return True  # each POST was answered 202: stored before the answer

        return SourceCase(
            type="http",
            table='path = "/conformance"',
            feed=post,
            consumed=answered,
            directory=tmp_path,
        )


# ------------------------------------------------------------------------------------ AMQP


def _routed(key: str) -> bytes:
    return orjson.dumps({"key": key, "route": "keep.it"})


class TestAmqpSink(SinkConformance):
    """RabbitMQ does not deduplicate: idempotency is the consumer's, on the `message_id`
    property the sink sets to busway's message id. The reader here handles each id once,
    as a careful consumer does, and checks that the id is the message's own."""

    @pytest.fixture
    async def sink_case(
        self, rabbit_server: RabbitServer, tmp_path: Path
    ) -> AsyncIterator[SinkCase]:
        seen: dict[str, str] = {}
        async with rabbit(rabbit_server.url) as client:
            queue = await client.queue()
            exchange = await client.exchange(bind={queue: "keep.#"})

            async def delivered() -> list[str]:
                for got in await client.drain(queue):
                    key = orjson.loads(got.body)["key"]
                    assert got.message_id == key, f"message_id {got.message_id} is not {key}"
                    seen.setdefault(got.message_id, key)
                return list(seen.values())

            keys = f'exchange = "{exchange}"\nrouting_key = "{{body.route}}"'
            yield SinkCase(
                type="amqp",
                table=f'url = "{rabbit_server.url}"\n{keys}',
                delivered=delivered,
                base_dir=tmp_path,
                payload=_routed,
                bad_payload=b'{"key": "refused", "route": "no.queue.bound"}',  # returned
                unreachable_table=f'url = "amqp://busway:pw@127.0.0.1:{free_port()}/"\n{keys}',
            )


class TestAmqpSource(SourceConformance):
    @pytest.fixture
    async def source_case(
        self, rabbit_server: RabbitServer, tmp_path: Path
    ) -> AsyncIterator[SourceCase]:
        async with rabbit(rabbit_server.url) as client:
            queue = await client.queue()

            async def feed(harness: Harness, keys: list[str]) -> None:
                for key in keys:  # the same message_id when fed again: the same message
                    await client.publish(queue, orjson.dumps({"key": key}), message_id=key)

            yield SourceCase(
                type="amqp",
                table=f'url = "{rabbit_server.url}"\nqueue = "{queue}"\nformat = "json"',
                feed=feed,
                directory=tmp_path,
            )


# ---------------------------------------------------------------------------- sftp sink, source


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    server = SshServer(tmp_path / "sshd")
    yield server
    server.stop()


def _files(folder: Path) -> list[Path]:
    """The delivered files: not the sink's `.<name>.busway-tmp` files still being written (a
    partner's poller skips dot-names the same way)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*") if p.is_file() and not p.name.startswith("."))


class TestSftpSink(SinkConformance):
    """Files named from the message id (the default): a redelivery finds its file there."""

    @pytest.fixture
    def sink_case(self, sshd: SshServer, tmp_path: Path) -> SinkCase:
        outbox = sshd.root / "out"

        async def delivered() -> list[str]:
            return [orjson.loads(path.read_bytes())["key"] for path in _files(outbox)]

        server = sshd.server_table()
        unreachable = server.replace(f"port = {sshd.port}", f"port = {free_port()}")
        return SinkCase(
            type="sftp",
            table=f'path = "{outbox}"\nname_template = "{{body.key}}.json"\n{server}',
            delivered=delivered,
            base_dir=tmp_path,
            bad_payload=b'{"no_key_here": 1}',  # its file cannot be named
            unreachable_table=f'path = "{outbox}"\n{unreachable}',
        )


class TestSftpSource(SourceConformance):
    @pytest.fixture
    def source_case(self, sshd: SshServer, tmp_path: Path) -> SourceCase:
        inbox = sshd.root / "outbox"
        inbox.mkdir()

        async def feed(harness: Harness, keys: list[str]) -> None:
            lines = b"".join(orjson.dumps({"key": key}) + b"\n" for key in keys)
            staging = inbox / ".staging.part"
            staging.write_bytes(lines)
            staging.rename(inbox / f"{keys[0]}.jsonl")  # appears whole

        async def refeed(harness: Harness, keys: list[str]) -> None:
            # The same file (same size and mtime) back where the partner left it, as a crash
            # before `done/` would leave it.
            done = inbox / "done" / f"{keys[0]}.jsonl"
            done.rename(inbox / done.name)

        return SourceCase(
            type="sftp",
            table=f'path = "{inbox}"\nstable_for = "0s"\ninterval = "100ms"\n'
            + sshd.server_table(),
            feed=feed,
            refeed=refeed,
            directory=tmp_path,
        )


# ------------------------------------------------------------------------------------ smtp sink


class TestSmtpSink(SinkConformance):
    """SMTP cannot refuse a duplicate: a redelivery is a second mail with the same
    `Message-ID` (tests/test_smtp.py checks that), so the sink does not claim idempotence."""

    @pytest.fixture
    def sink_case(self, tmp_path: Path) -> Iterator[SinkCase]:
        server = MailServer(tmp_path)

        async def delivered() -> list[str]:
            return [orjson.loads(r.mail.get_content())["key"] for r in server.mails]

        common = 'security = "none"\nsender = "busway@example.com"\nto = ["ops@example.com"]\n'
        common += 'subject = "key {body.key}"\ntimeout = "5s"\n'
        try:
            yield SinkCase(
                type="smtp",
                table=f'host = "127.0.0.1"\nport = {server.port}\n{common}',
                delivered=delivered,
                base_dir=tmp_path,
                idempotent=False,
                bad_payload=b'{"no_key_here": 1}',  # its subject cannot be filled
                unreachable_table=f'host = "127.0.0.1"\nport = {free_port()}\n{common}',
            )
        finally:
            server.stop()


# ---------------------------------------------------------------------------------------- mqtt


class TestMqttSink(SinkConformance):
    """QoS 1 to a Mosquitto broker; at least once, so not idempotent (a redelivered message is
    published again; MQTT 5 subscribers can drop it by its `busway-message-id` property)."""

    @pytest.fixture
    async def sink_case(self, mosquitto: MosquittoBroker, tmp_path: Path) -> SinkCase:
        subscriber = Subscriber(mosquitto, ["conformance/#"], client_id="conformance-reader")
        await subscriber.subscribe()

        async def delivered() -> list[str]:
            return [orjson.loads(payload)["key"] for _, payload in await subscriber.drain()]

        return SinkCase(
            type="mqtt",
            table=f'max_payload = 1000\nconnection = {{ url = "{mosquitto.url}" }}',
            delivered=delivered,
            base_dir=tmp_path,
            idempotent=False,
            bad_payload=b"x" * 1001,
            unreachable_table=f'connection = {{ url = "mqtt://127.0.0.1:{free_port()}" }}',
        )


class TestMqttSource(SourceConformance):
    """QoS 1 from a Mosquitto broker; the same payload on the same topic again (as the broker
    sends it after a crash before the PUBACK) has the same id, so JetStream stores it once."""

    @pytest.fixture
    def source_case(self, mosquitto: MosquittoBroker, tmp_path: Path) -> SourceCase:
        import aiomqtt

        async def feed(harness: Harness, keys: list[str]) -> None:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as device:
                for key in keys:
                    await device.publish("conformance/in", orjson.dumps({"key": key}), qos=1)

        return SourceCase(
            type="mqtt",
            table=(
                'topics = ["conformance/#"]\nlease_ttl = "1s"\n'
                f'connection = {{ url = "{mosquitto.url}" }}'
            ),
            feed=feed,
            directory=tmp_path,
        )


def test_every_built_in_adapter_is_checked_here() -> None:
    """A new built-in adapter type fails this until a conformance class above covers it."""
    covered = {"amqp", "file", "http", "sqlite", "postgres", "mysql", "mqtt", "sftp", "smtp"}
    assert set(default_registry().types) == covered


def test_a_sqlite_file_that_cannot_be_opened_leaves_no_thread_behind(tmp_path: Path) -> None:
    """Found by the unreachable-target check: a failed open left aiosqlite's worker thread to
    finish on its own, and when the loop closed first (a daemon stopping, a test ending) the
    thread died with a traceback ("Event loop is closed")."""
    database = SqliteDatabase(str(tmp_path / "no" / "such" / "dir.db"), busy_timeout=1.0)
    crashed: list[BaseException | None] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: crashed.append(args.exc_value)

    async def open_and_fail() -> list[threading.Thread]:
        before = set(threading.enumerate())
        with pytest.raises(RetryableError, match="unable to open database file"):
            await database.open()
        return [
            thread
            for thread in threading.enumerate()
            if thread not in before and "_connection_worker_thread" in thread.name
        ]

    try:
        left = [asyncio.run(open_and_fail()) for _ in range(10)]
        for thread in threading.enumerate():
            if thread is not threading.current_thread() and not thread.daemon:
                thread.join(timeout=5)
    finally:
        threading.excepthook = previous
    assert left == [[]] * 10, f"threads still running after open() failed: {left}"
    assert crashed == []
