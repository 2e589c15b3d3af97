"""The `file` sink on real files: on disk before the ack; failures retried or dead-lettered."""

from __future__ import annotations

import contextlib
import resource
import signal
import socket
import threading
import time
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import BatchError, BuildContext, Bus, ConfigError, Message, RetryableError
from busway.adapters.file import FileSink, FileSinkConfig
from busway.adapters.file._index import VERSION, intent_line, read_index
from tests.configs import config_toml, stream_table
from tests.files_support import append, tree
from tests.support import (
    Daemon,
    NatsServer,
    decode_test_config,
    eventually,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def sink_config(server: NatsServer, unique: str, path: str) -> str:
    return (
        config_toml(server, streams=[stream_table(f"OUT_{unique}", f"out{unique}.>")])
        + f"""
[[sinks]]
name = "file{unique}"
type = "file"
from = "out{unique}.>"
path = "{path}"
retry = {{ max_attempts = 50, backoff = "50ms", max_backoff = "100ms" }}
"""
    )


async def test_messages_are_appended_as_json_lines(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(sink_config(nats_server, unique, "out/orders.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        for i in range(300):
            await js.publish(f"out{unique}.x", orjson.dumps({"n": i}))
        # A pretty-printed body is still one line in the file.
        await js.publish(f"out{unique}.x", b'{\n  "n": 300\n}')

        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.metrics.stats[0].published == 301
    lines = (tmp_path / "out" / "orders.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["n"] for line in lines] == list(range(301))


async def test_non_json_body_is_dead_lettered_and_the_rest_written(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(sink_config(nats_server, unique, "out.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(f"out{unique}.x", b'{"n": 1}')
        await js.publish(f"out{unique}.x", b"plain text")
        await js.publish(f"out{unique}.x", b'{"n": 2}')

        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.metrics.stats[0].dead_lettered == 1
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"n": 1}\n{"n": 2}\n'
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.file{unique}"
    ]
    assert [m.data for m in dead] == [b"plain text"]
    assert dead[0].headers and "is not JSON" in dead[0].headers["Busway-Error"]


async def test_unwritable_path_is_retried_until_it_works_and_readiness_shows_it(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file where the sink wants a directory")
    config = decode_test_config(sink_config(nats_server, unique, "out/orders.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(f"out{unique}.x", b'{"n": 1}')
        stats = bus.metrics.stats[0]

        async def failing() -> bool:
            return stats.retried >= 2

        await eventually(failing)
        assert bus.readiness()[f"sink:file{unique}"] is False
        assert stats.errors["retryable"] >= 2
        blocker.unlink()

        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.readiness()[f"sink:file{unique}"] is True
        assert stats.dead_lettered == 0
    assert (tmp_path / "out" / "orders.jsonl").read_bytes() == b'{"n": 1}\n'


async def test_two_daemons_write_files_of_their_own_named_by_daemon(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    total = 5_000
    config = tmp_path / "busway.toml"
    config.write_text(sink_config(nats_server, unique, "out/orders-{daemon}.jsonl"))
    names = ("alpha", "beta")
    daemons = [
        Daemon(config, log=tmp_path / f"{name}.log", env={"BUSWAY_DAEMON": name}) for name in names
    ]
    try:
        for daemon in daemons:
            daemon.start()
        for daemon in daemons:
            await daemon.ready()
        js = nc.jetstream()
        for start in range(0, total, 500):
            acks = [
                await js.publish_async(f"out{unique}.x", orjson.dumps({"n": n}))
                for n in range(start, start + 500)
            ]
            for ack in acks:
                await ack
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}", timeout=120)
        for daemon in daemons:
            assert await daemon.stop() == 0, daemon.output()
    finally:
        for daemon in daemons:
            daemon.kill()
    out = tmp_path / "out"
    assert [name for name in tree(out) if name.endswith(".jsonl")] == [
        "orders-alpha.jsonl",
        "orders-beta.jsonl",
    ]
    written = {name: lines_of(out / f"orders-{name}.jsonl") for name in names}
    assert all(written.values()), "one daemon wrote everything: the test proves nothing"
    assert sorted(written["alpha"] + written["beta"]) == list(range(total))


async def test_daemon_in_a_path_is_busway_daemon_else_the_host_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("BUSWAY_DAEMON", raising=False)
    appending = FileSinkConfig(name="f", from_="x", path="out/{daemon}.jsonl")
    host = FileSink(appending, BuildContext(base_dir=tmp_path))
    assert host.path == tmp_path / "out" / f"{socket.gethostname()}.jsonl"
    monkeypatch.setenv("BUSWAY_DAEMON", "node-2")
    per_message = FileSinkConfig(
        name="f", from_="x", mode="per-message", path="out/{daemon}/{id}.json"
    )
    sink = FileSink(per_message, BuildContext(base_dir=tmp_path))
    await sink.write([message(1)])
    assert tree(tmp_path) == ["out/node-2/S:1.json"]


def test_a_daemon_name_that_cannot_name_a_file_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BUSWAY_DAEMON", "../etc")
    config = FileSinkConfig(name="f", from_="x", path="out/{daemon}.jsonl")
    with pytest.raises(ConfigError) as raised:
        FileSink(config, BuildContext(base_dir=tmp_path))
    assert "BUSWAY_DAEMON='../etc' cannot name a file" in str(raised.value)
    # A config without {daemon} does not care.
    FileSink(FileSinkConfig(name="f", from_="x", path="out.jsonl"), BuildContext(base_dir=tmp_path))
    with pytest.raises(ValueError, match=r"no placeholder that differs between messages"):
        FileSinkConfig(name="f", from_="x", mode="per-message", path="out/{daemon}.json")


def file_sink_config(server: NatsServer, unique: str, options: str) -> str:
    return (
        config_toml(server, streams=[stream_table(f"OUT_{unique}", f"out{unique}.>")])
        + f"""
[[sinks]]
name = "file{unique}"
type = "file"
from = "out{unique}.>"
retry = {{ max_attempts = 50, backoff = "50ms", max_backoff = "100ms" }}
{options}
"""
    )


def message(
    n: int,
    *,
    stream: str = "S",
    data: bytes | None = None,
    id: str | None = None,
    sequence: int | None = None,
) -> Message:
    """Message `{"n": n}`, by default at sequence n and without a Nats-Msg-Id (id S:n)."""
    body = data if data is not None else orjson.dumps({"n": n})
    return Message(
        subject="out.x",
        data=body,
        headers={},
        id=id if id is not None else f"{stream}:{n}",
        stream=stream,
        sequence=sequence if sequence is not None else n,
        attempt=1,
    )


def lines_of(*paths: Path) -> list[int]:
    return [orjson.loads(line)["n"] for path in paths for line in path.read_bytes().splitlines()]


async def test_append_rotates_by_size_into_complete_templated_files(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    options = (
        'path = "out/orders.jsonl"\nrotate_bytes = 400\n'
        'rotated_path = "archive/{stem}-{start:%Y%m%d}{suffix}"\nbatch_size = 8'
    )
    config = decode_test_config(file_sink_config(nats_server, unique, options), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        for i in range(200):
            await js.publish(f"out{unique}.x", orjson.dumps({"n": i}))
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
    archive = sorted((tmp_path / "out" / "archive").iterdir(), key=lambda p: p.stat().st_mtime_ns)
    assert len(archive) >= 4
    assert all(p.name.startswith("orders-") and p.suffix == ".jsonl" for p in archive)
    assert all(0 < p.stat().st_size <= 400 for p in archive)
    # Every message exactly once, in order, across the rotated files and the live one.
    assert sorted(lines_of(*archive, tmp_path / "out" / "orders.jsonl")) == list(range(200))
    assert lines_of(*archive, tmp_path / "out" / "orders.jsonl") == list(range(200))


async def test_append_rotates_when_the_time_window_changes(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    options = (
        'path = "out.jsonl"\nrotate_every = "1s"\nrotated_path = "{stem}-{end:%H%M%S%f}{suffix}"'
    )
    config = decode_test_config(file_sink_config(nats_server, unique, options), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await js.publish(f"out{unique}.x", b'{"n": 1}')
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        second = int(time.time())

        async def next_second() -> bool:
            return int(time.time()) > second

        await eventually(next_second)
        await js.publish(f"out{unique}.x", b'{"n": 2}')
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
    rotated = [name for name in tree(tmp_path) if name.startswith("out-")]
    assert len(rotated) == 1
    assert (tmp_path / rotated[0]).read_bytes() == b'{"n": 1}\n'
    assert (tmp_path / "out.jsonl").read_bytes() == b'{"n": 2}\n'


async def test_a_redelivered_batch_is_not_appended_twice_and_a_torn_tail_is_dropped(
    tmp_path: Path,
) -> None:
    config = FileSinkConfig(name="f", from_="x", path="out.jsonl")
    sink = FileSink(config, BuildContext(base_dir=tmp_path))
    await sink.open()
    await sink.write([message(1), message(2)])
    # The engine's ack was lost: the same messages come again, with a new one.
    await sink.write([message(1), message(2), message(3)])
    await sink.close()
    out = tmp_path / "out.jsonl"
    assert lines_of(out) == [1, 2, 3]

    # A crash while a batch's bytes were being written: its intent (range, CRC, ids) is in
    # the index, its bytes are cut short.
    size = out.stat().st_size
    append(
        out.with_name("out.jsonl.ids"), intent_line(size, b'{"n": 4}\n{"n": 5}\n', ["S:4", "S:5"])
    )
    append(out, b'{"n": 4}\n{"n": 5')
    restarted = FileSink(config, BuildContext(base_dir=tmp_path))
    await restarted.open()
    assert lines_of(out) == [1, 2, 3]
    await restarted.write([message(3), message(4), message(5)])  # redelivered after restart
    await restarted.close()
    assert lines_of(out) == [1, 2, 3, 4, 5]


async def test_a_message_stored_again_under_its_id_is_not_appended_after_restarts_or_rotations(
    tmp_path: Path,
) -> None:
    # A source resuming from an old checkpoint after the stream's duplicate window, or a
    # replayed dead letter: the same Message.id comes back as a new stream message.
    config = FileSinkConfig(name="f", from_="x", path="out.jsonl", rotate_bytes=30)
    first = FileSink(config, BuildContext(base_dir=tmp_path))
    await first.open()
    originals = [message(n, id=f"inbox:abc:{n}") for n in range(1, 5)]
    await first.write(originals[:2])
    await first.write(originals[2:])  # rotates: the first two are in a rotated file now
    await first.close()
    again = [message(n, id=f"inbox:abc:{n}", sequence=100 + n) for n in range(1, 5)]
    restarted = FileSink(config, BuildContext(base_dir=tmp_path))
    await restarted.open()
    await restarted.write([*again, message(5, id="inbox:abc:5", sequence=105)])
    await restarted.close()
    files = sorted(tmp_path / name for name in tree(tmp_path) if name.endswith(".jsonl"))
    assert len(files) >= 2, "the test must span a rotation"
    assert sorted(lines_of(*files)) == [1, 2, 3, 4, 5]


async def test_an_index_keyed_by_stream_and_sequence_is_migrated_to_message_ids(
    tmp_path: Path,
) -> None:
    # An index written by the previous version: ids are <stream>:<sequence>, and the last
    # batch (ORDERS 1-2) was written but not acked when that daemon stopped.
    out = tmp_path / "out.jsonl"
    lines = b'{"n": 1}\n{"n": 2}\n'
    out.write_bytes(lines)
    index = out.with_name("out.jsonl.ids")
    index.write_bytes(
        b'{"v": 2, "start": %d, "end": 0}\n{"ids": ["ORDERS:7"]}\n' % time.time()
        + intent_line(0, lines, ["ORDERS:1", "ORDERS:2"])
    )
    config = FileSinkConfig(name="f", from_="x", path="out.jsonl")
    upgraded = FileSink(config, BuildContext(base_dir=tmp_path))
    await upgraded.open()
    state = read_index(index)
    assert state is not None and state.version == VERSION
    assert state.ids == {"ORDERS:7": True, "ORDERS:1": True, "ORDERS:2": True}
    # The unacked batch comes again, now known by its Nats-Msg-Id, with a new message.
    await upgraded.write([message(n, stream="ORDERS", id=f"inbox:abc:{n}") for n in (1, 2, 3)])
    await upgraded.close()
    assert lines_of(out) == [1, 2, 3]
    restarted = FileSink(config, BuildContext(base_dir=tmp_path))
    await restarted.open()
    state = read_index(index)
    assert state is not None
    assert state.ids == {"ORDERS:7": True, "ORDERS:1": True, "ORDERS:2": True, "inbox:abc:3": False}
    # After a second restart the old keys still recognise a late redelivery, and message 3
    # is recognised by its id whatever its sequence.
    await restarted.write(
        [
            message(2, stream="ORDERS", id="inbox:abc:2"),
            message(3, stream="ORDERS", id="inbox:abc:3", sequence=40),
            message(4, stream="ORDERS", id="inbox:abc:4"),
        ]
    )
    await restarted.close()
    assert lines_of(out) == [1, 2, 3, 4]


async def test_disk_full_leaves_no_partial_line_is_retryable_and_recovers(tmp_path: Path) -> None:
    # A real short write: the file-size limit (RLIMIT_FSIZE) makes write() stop part-way and
    # then fail with EFBIG, as a disk filling up does with ENOSPC.
    config = FileSinkConfig(name="f", from_="x", path="out.jsonl", index_size=10, max_in_flight=10)
    sink = FileSink(config, BuildContext(base_dir=tmp_path))
    await sink.open()
    await sink.write([message(1)])
    out = tmp_path / "out.jsonl"
    before = out.read_bytes()
    big = [message(n, data=orjson.dumps({"n": n, "pad": "x" * 3000})) for n in range(2, 6)]
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 5000, hard))
        with pytest.raises(RetryableError) as raised:
            await sink.write(big)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    assert f"cannot write {out}: File too large" in str(raised.value)
    assert sink.ready() is False
    assert out.read_bytes() == before  # truncated back: no partial line
    await sink.write(big)  # the retry
    assert sink.ready() is True
    await sink.close()
    assert lines_of(out) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("mode", ["append", "per-message"])
@pytest.mark.parametrize("obstacle", ["directory", "symlink-loop"])
async def test_a_path_that_is_a_directory_or_a_link_loop_is_explained_retried_and_recovers(
    tmp_path: Path, mode: str, obstacle: str
) -> None:
    # A link loop at a per-message file's own name is simply replaced by the rename: the
    # loop that stops it is on its directory.
    looped = mode == "per-message" and obstacle == "symlink-loop"
    path = "out.jsonl" if mode == "append" else "sub/{seq}.json" if looped else "{seq}.json"
    target = tmp_path / path.replace("{seq}", "1")
    obstacle_path = target.parent if looped else target
    if obstacle == "directory":
        obstacle_path.mkdir()
        expected, hint = "Is a directory", "the path is a directory: set `path` to a file name"
    else:
        obstacle_path.symlink_to(obstacle_path)
        expected, hint = "Too many levels of symbolic links", "a symbolic link loop in the path"
    config = FileSinkConfig(name="f", from_="x", path=path, mode=mode)  # type: ignore[arg-type]
    sink = FileSink(config, BuildContext(base_dir=tmp_path))  # no traceback building it
    await sink.open()  # not fatal: the path may be fixed while the daemon runs
    with pytest.raises((RetryableError, BatchError)) as raised:
        await sink.write([message(1)])
    error = raised.value
    if isinstance(error, BatchError):
        error = error.failures[0]
    assert isinstance(error, RetryableError), error
    assert f"{target}: {expected} ({hint}" in str(error)
    assert sink.ready() is False
    if obstacle == "directory":
        obstacle_path.rmdir()
    else:
        obstacle_path.unlink()
    await sink.write([message(1)])  # the retry
    await sink.close()
    assert sink.ready() is True
    assert lines_of(target) == [1]


async def test_per_message_files_are_named_from_the_message_and_written_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    options = (
        'mode = "per-message"\n'
        'path = "docs/{subject[1]}/{header[X-Tenant]}/{body[order.id]}-{seq}.json"'
    )
    config = decode_test_config(file_sink_config(nats_server, unique, options), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(
            f"out{unique}.invoices", b'{"order": {"id": 7}}', headers={"X-Tenant": "acme"}
        )
        await js.publish(
            f"out{unique}.invoices", b'{"order": {"id": "../../etc"}}', headers={"X-Tenant": "a/b"}
        )
        await js.publish(f"out{unique}.invoices", b'{"order": {"id": 9}}')  # no X-Tenant
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.metrics.stats[0].dead_lettered == 1
    assert tree(tmp_path) == [
        "docs/invoices/a_b/.._.._etc-2.json",
        "docs/invoices/acme/7-1.json",
    ]
    assert (tmp_path / "docs/invoices/acme/7-1.json").read_bytes() == b'{"order": {"id": 7}}'
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.file{unique}"
    ]
    assert len(dead) == 1
    assert dead[0].headers and "header 'X-Tenant' is missing" in dead[0].headers["Busway-Error"]


async def test_per_message_readers_never_see_half_a_file_and_redelivery_makes_no_copy(
    tmp_path: Path,
) -> None:
    config = FileSinkConfig(name="f", from_="x", mode="per-message", path="out/{id}.bin")
    sink = FileSink(config, BuildContext(base_dir=tmp_path))
    body = b"0123456789abcdef" * 16384  # 256 KiB
    seen_sizes: set[int] = set()
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            folder = tmp_path / "out"
            for path in list(folder.iterdir()) if folder.is_dir() else []:
                if not path.name.startswith("."):
                    with contextlib.suppress(FileNotFoundError):
                        seen_sizes.add(len(path.read_bytes()))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for start in range(0, 40, 8):
            await sink.write([message(n, data=body) for n in range(start, start + 8)])
        await sink.write([message(n, data=body) for n in range(0, 8)])  # redelivered
    finally:
        stop.set()
        thread.join()
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == sorted(f"S:{n}.bin" for n in range(40))  # no temporary files left
    assert seen_sizes <= {len(body)}
    assert all(p.read_bytes() == body for p in (tmp_path / "out").iterdir())


async def test_per_message_unwritable_directory_is_retried_until_it_works(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file where the sink wants a directory")
    options = 'mode = "per-message"\npath = "out/{seq}.json"'
    config = decode_test_config(file_sink_config(nats_server, unique, options), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as bus:
        await js.publish(f"out{unique}.x", b'{"n": 1}')
        stats = bus.metrics.stats[0]

        async def failing() -> bool:
            return stats.retried >= 2

        await eventually(failing)
        assert bus.readiness()[f"sink:file{unique}"] is False
        blocker.unlink()
        await wait_settled(nc, f"OUT_{unique}", f"busway-sink-file{unique}")
        assert bus.readiness()[f"sink:file{unique}"] is True
        assert stats.dead_lettered == 0
    assert (tmp_path / "out" / "1.json").read_bytes() == b'{"n": 1}'


def test_an_index_smaller_than_max_in_flight_is_refused(tmp_path: Path) -> None:
    # After a crash every un-acked message can come again: an index that cannot hold them all
    # would let some through twice.
    text = """
[[streams]]
name = "OUT"
subjects = ["out.>"]

[[sinks]]
name = "file"
type = "file"
from = "out.>"
path = "out.jsonl"
max_in_flight = 500
index_size = 100
"""
    with pytest.raises(ConfigError) as raised:
        decode_test_config(text, tmp_path)
    assert raised.value.path == "$.sinks[0].index_size"
    assert "index_size (100) must be at least max_in_flight (500)" in str(raised.value)
