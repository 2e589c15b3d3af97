"""The `file` source on real directories: watched, claimed once, published, moved after PubAcks."""

from __future__ import annotations

import codecs
import errno
import logging
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import generate_latest

from busway import Bus, StartupError
from busway.adapters.file import _claim
from busway.adapters.file._ready import ReadyTracker
from tests.files_support import (
    append,
    drop,
    file_source,
    header,
    jsonl,
    messages_of,
    names,
    source_config,
)
from tests.support import (
    Daemons,
    NatsServer,
    decode_test_config,
    eventually,
    stream_messages,
    wait_for,
)

pytestmark = pytest.mark.anyio


async def wait_for_files(folder: Path, expected: list[str], timeout: float = 30.0) -> None:
    async def arrived() -> bool:
        return names(folder) == expected

    await eventually(arrived, timeout=timeout)


async def dead_letters(nc: NatsClient, component: str) -> list[object]:
    return [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.{component}"
    ]


async def test_jsonl_files_at_start_up_and_dropped_while_running_are_published_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop(inbox / "a.jsonl", jsonl(300))
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options='ready = "rename"'), tmp_path
    )
    async with Bus(config) as bus:
        await wait_for_files(inbox / "done", ["a.jsonl"])
        b_content = b'{"n": 1}\n\n  \n{"n": 2}\r\n'  # blank lines, CRLF
        drop(inbox / "b.jsonl", b_content)
        await wait_for_files(inbox / "done", ["a.jsonl", "b.jsonl"])
        source = file_source(bus)
        stats = bus.metrics.stats[0]
        assert (source.files.claimed, source.files.done, source.files.failed) == (2, 2, 0)
        assert source.files.bytes == len(jsonl(300)) + len(b_content)
        assert (stats.received, stats.published, stats.dead_lettered) == (302, 302, 0)
        assert stats.events["files_done"] == 2
        metrics = generate_latest(bus.metrics_registry).decode()
        assert 'event="files_claimed",kind="source"} 2.0' in metrics

    messages = await messages_of(nc, f"IN_{unique}")
    a = [m for m in messages if header(m, "Busway-File") == "a.jsonl"]
    b = [m for m in messages if header(m, "Busway-File") == "b.jsonl"]
    assert [orjson.loads(m.data)["n"] for m in a] == list(range(1, 301))
    assert [header(m, "Busway-File-Line") for m in a] == [str(i) for i in range(1, 301)]
    assert [m.data for m in b] == [b'{"n": 1}', b'{"n": 2}']
    assert [header(m, "Busway-File-Line") for m in b] == ["1", "4"]
    ids = [header(m, "Nats-Msg-Id") for m in messages]
    assert len(set(ids)) == 302
    assert all(i.startswith(f"inbox{unique}:") for i in ids)
    assert ids[0].endswith(":1")
    assert names(inbox) == []
    assert names(inbox / "processing") == []


async def test_a_file_written_slowly_is_not_taken_before_it_is_stable(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options='stable_for = "1s"'), tmp_path
    )
    async with Bus(config):
        # An appender that reopens the file by name for every line, as loggers do: had the
        # source claimed it early, the next lines would start a second file in the inbox.
        for i in range(1, 16):
            append(inbox / "slow.jsonl", b'{"n": %d}\n' % i)
            await anyio.sleep(0.1)
        await wait_for_files(inbox / "done", ["slow.jsonl"])
    messages = await messages_of(nc, f"IN_{unique}")
    assert [orjson.loads(m.data)["n"] for m in messages] == list(range(1, 16))
    assert names(inbox) == []


async def test_marker_mode_waits_for_the_done_file_and_ignores_others(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "marker"\npatterns = ["*.jsonl"]'
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    async with Bus(config):
        (inbox / "first.jsonl").write_bytes(jsonl(3))
        (inbox / "notes.txt").write_bytes(b"not matched")
        (inbox / ".hidden.jsonl").write_bytes(jsonl(1))
        (inbox / "second.jsonl").write_bytes(jsonl(2, start=10))
        (inbox / "second.jsonl.done").touch()
        await wait_for_files(inbox / "done", ["second.jsonl"])
        # The scan that took `second` saw `first` too, without its marker: it stays.
        assert names(inbox) == [".hidden.jsonl", "first.jsonl", "notes.txt"]
        (inbox / "first.jsonl.done").touch()
        await wait_for_files(inbox / "done", ["first.jsonl", "second.jsonl"])
        assert names(inbox) == [".hidden.jsonl", "notes.txt"]  # the marker is removed
    messages = await messages_of(nc, f"IN_{unique}")
    assert sorted(orjson.loads(m.data)["n"] for m in messages) == [1, 2, 3, 10, 11]


async def test_a_marker_is_seen_by_its_watch_event_not_at_the_next_rescan(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "marker"\npatterns = ["*.jsonl"]'
    text = source_config(nats_server, unique, inbox, options=options)
    config = decode_test_config(text.replace('rescan = "1s"', 'rescan = "60s"'), tmp_path)
    (inbox / "early.jsonl.done").touch()
    drop(inbox / "early.jsonl", jsonl(1, start=10))
    async with Bus(config):
        await wait_for_files(inbox / "done", ["early.jsonl"])  # the start-up scan is over
        (inbox / "order.jsonl").write_bytes(jsonl(2))
        # A file whose marker is there first is taken when its own event comes (the next
        # scan is a minute away): then the earlier events of `order.jsonl` were handled too.
        (inbox / "probe.jsonl.done").touch()
        drop(inbox / "probe.jsonl", jsonl(1, start=20))
        await wait_for_files(inbox / "done", ["early.jsonl", "probe.jsonl"], timeout=20)
        assert names(inbox) == ["order.jsonl"]
        (inbox / "order.jsonl.done").touch()
        # Only the marker's own event can find `order.jsonl` before the next scan.
        await wait_for_files(
            inbox / "done", ["early.jsonl", "order.jsonl", "probe.jsonl"], timeout=20
        )
    messages = await messages_of(nc, f"IN_{unique}")
    assert sorted(orjson.loads(m.data)["n"] for m in messages) == [1, 2, 10, 20]


async def test_two_daemons_on_one_directory_process_each_file_exactly_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "rename"\nconcurrency = 2\nwindow = 64'
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    files = [f"f{i:02}.jsonl" for i in range(24)]
    async with Bus(config) as one, Bus(config) as two:
        for i, name in enumerate(files):
            drop(inbox / name, jsonl(100, start=i * 100))
        await wait_for_files(inbox / "done", files, timeout=60)
        sources = [file_source(one), file_source(two)]
        published = [bus.metrics.stats[0].published for bus in (one, two)]
    # Had both taken a file, both would have published (and counted) its lines; the stream's
    # dedup would hide the copies, so count what each daemon published, not what is stored.
    assert sum(published) == 2400
    assert sum(s.files.claimed + s.files.resumed for s in sources) == 24
    assert sum(s.files.done for s in sources) == 24
    messages = await messages_of(nc, f"IN_{unique}")
    assert sorted(orjson.loads(m.data)["n"] for m in messages) == list(range(2400))
    assert names(inbox / "processing") == []


async def test_csv_quotes_embedded_newlines_bom_and_bad_rows(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "rename"\nformat = "csv"'
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    text = (
        "id,name,comment\r\n"
        '1,"Smith, Ada","said ""hi"""\r\n'
        '2,Bob,"two\nlines"\r\n'
        "3,short\r\n"
        "\r\n"
        "4,Zoë,ok\r\n"
    )
    async with Bus(config) as bus:
        drop(inbox / "people.csv", codecs.BOM_UTF8 + text.encode())
        await wait_for_files(inbox / "done", ["people.csv"])
        stats = bus.metrics.stats[0]
        assert (stats.received, stats.published, stats.dead_lettered) == (4, 3, 1)
    messages = await messages_of(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in messages] == [
        {"id": "1", "name": "Smith, Ada", "comment": 'said "hi"'},
        {"id": "2", "name": "Bob", "comment": "two\nlines"},
        {"id": "4", "name": "Zoë", "comment": "ok"},
    ]
    assert [header(m, "Busway-File-Line") for m in messages] == ["2", "3", "7"]
    assert [header(m, "Busway-File-Row") for m in messages] == ["1", "2", "4"]
    dead = await dead_letters(nc, f"inbox{unique}")
    assert len(dead) == 1
    assert dead[0].data == b"3,short\r\n"  # type: ignore[attr-defined]
    assert header(dead[0], "Busway-Origin") == "people.csv:5"  # type: ignore[arg-type]
    assert "row has 2 fields, the header has 3" in header(dead[0], "Busway-Error")  # type: ignore[arg-type]


async def test_csv_in_another_encoding_and_delimiter(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = (
        'ready = "rename"\nformat = "csv"\nencoding = "latin-1"\ndelimiter = ";"\nquotechar = "\'"'
    )
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    async with Bus(config):
        drop(
            inbox / "ventes.csv",
            "ville;prix\n'Orléans; centre';12,50\nGenève;3\n".encode("latin-1"),
        )
        await wait_for_files(inbox / "done", ["ventes.csv"])
    messages = await messages_of(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in messages] == [
        {"ville": "Orléans; centre", "prix": "12,50"},
        {"ville": "Genève", "prix": "3"},
    ]


async def test_bad_jsonl_lines_are_dead_lettered_with_file_and_line(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "rename"\nmax_line = 64'
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    content = b'{"n": 1}\n{"n": \n{"n": 3}\n{"long": "' + b"x" * 100 + b'"}\n{"n": 5}\n'
    async with Bus(config) as bus:
        drop(inbox / "mixed.jsonl", content)
        await wait_for_files(inbox / "done", ["mixed.jsonl"])
        assert bus.metrics.stats[0].dead_lettered == 2
        assert bus.metrics.stats[0].errors == {"bad_line": 2}
    messages = await messages_of(nc, f"IN_{unique}")
    assert [m.data for m in messages] == [b'{"n": 1}', b'{"n": 3}', b'{"n": 5}']
    dead = await dead_letters(nc, f"inbox{unique}")
    assert [header(m, "Busway-File-Line") for m in dead] == ["2", "4"]  # type: ignore[arg-type]
    assert [header(m, "Busway-File") for m in dead] == ["mixed.jsonl"] * 2  # type: ignore[arg-type]
    assert "not JSON" in header(dead[0], "Busway-Error")  # type: ignore[arg-type]
    assert "longer than max_line" in header(dead[1], "Busway-Error")  # type: ignore[arg-type]


async def test_fail_file_mode_moves_a_bad_file_to_failed_and_publishes_none_of_it(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "rename"\non_error = "fail-file"'
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    async with Bus(config) as bus:
        drop(inbox / "bad.jsonl", b'{"n": 1}\n{"n": 2}\nnot json\n{"n": 4}\n')
        drop(inbox / "good.jsonl", jsonl(2))
        await wait_for_files(inbox / "failed", ["bad.jsonl", "bad.jsonl.error"])
        await wait_for_files(inbox / "done", ["good.jsonl"])
        assert file_source(bus).files.failed == 1
    error = (inbox / "failed" / "bad.jsonl.error").read_text()
    assert "line 3: not JSON" in error
    messages = await messages_of(nc, f"IN_{unique}")
    assert [header(m, "Busway-File") for m in messages] == ["good.jsonl"] * 2
    assert await dead_letters(nc, f"inbox{unique}") == []


def write_named(folder: Path, name: bytes, data: bytes) -> None:
    """Write a file whose name is raw bytes (not necessarily UTF-8) into `folder`."""
    with open(os.path.join(os.fsencode(folder), name), "wb") as file:
        file.write(data)


async def test_a_file_whose_name_cannot_be_a_header_goes_to_failed_and_the_rest_flows(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A name that is not UTF-8 cannot go into the Busway-File header (it crash-looped the
    # source), nor can one with a line break (it would end the header early).
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    not_utf8, line_break = b"bad-\xff\xfe.jsonl", b"two\nlines.jsonl"
    for name in (not_utf8, line_break):
        write_named(inbox, name, jsonl(2))
    drop(inbox / "before.jsonl", jsonl(2))
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options='ready = "rename"'), tmp_path
    )
    caplog.set_level(logging.WARNING)
    async with Bus(config) as bus:
        await wait_for_files(inbox / "done", ["before.jsonl"])
        drop(inbox / "after.jsonl", jsonl(2, start=3))
        await wait_for_files(inbox / "done", ["after.jsonl", "before.jsonl"])

        async def both_failed() -> bool:
            return file_source(bus).files.failed == 2

        await eventually(both_failed)
        stats = bus.metrics.stats[0]
        assert stats.errors == {"bad_file": 2}  # counted, and no source_crashed
    failed = sorted(os.listdir(os.fsencode(inbox / "failed")))
    assert failed == sorted([not_utf8, not_utf8 + b".error", line_break, line_break + b".error"])
    assert sorted(os.listdir(os.fsencode(inbox))) == [b"done", b"failed", b"processing"]
    error = (inbox / "failed" / os.fsdecode(not_utf8 + b".error")).read_text()
    assert "file: bad-\\xff\\xfe.jsonl\n" in error
    assert "its name is not valid UTF-8" in error
    logged = [record.getMessage() for record in caplog.records]
    assert any(
        line.startswith("bad-\\xff\\xfe.jsonl failed: its name is not valid UTF-8")
        for line in logged
    ), logged
    assert any(line.startswith("two\\nlines.jsonl failed: its name holds") for line in logged)
    messages = await messages_of(nc, f"IN_{unique}")
    assert [orjson.loads(m.data)["n"] for m in messages] == [1, 2, 3, 4]


async def test_a_file_removed_from_processing_while_published_is_not_retried_forever(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    # Busway reads a claimed file through its open descriptor, so removing it from
    # processing/ loses nothing; there is just nothing left to move to done/ afterwards.
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    total = 3000
    options = 'ready = "rename"\nwindow = 1'  # slow enough to remove the file mid-way
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    async with Bus(config) as bus:
        drop(inbox / "big.jsonl", jsonl(total))
        await wait_for_files(inbox / "processing", ["big.jsonl"])
        (inbox / "processing" / "big.jsonl").unlink()
        drop(inbox / "next.jsonl", jsonl(2, start=total + 1))
        await wait_for_files(inbox / "done", ["next.jsonl"], timeout=60)
        source = file_source(bus)

        async def settled() -> bool:
            return source.files.done == 2

        await eventually(settled)
        assert bus.metrics.stats[0].errors == {"vanished": 1}
    assert names(inbox / "processing") == []
    numbers = sorted(orjson.loads(m.data)["n"] for m in await messages_of(nc, f"IN_{unique}"))
    assert numbers == list(range(1, total + 3))


class DeniedOs:
    """`os` as the inbox sees it, refusing to open files named `*secret*` (tests run as root,
    whom file permissions do not stop)."""

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        if "secret" in os.fsdecode(path):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
        return os.open(path, flags, mode)


async def test_a_file_that_cannot_be_opened_goes_to_failed_and_blocks_no_other(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "processing").mkdir(parents=True)
    # Left in processing/ by a daemon that died: one unreadable, one to resume.
    (inbox / "processing" / "a-secret-orphan.jsonl").write_bytes(jsonl(1))
    (inbox / "processing" / "b-orphan.jsonl").write_bytes(jsonl(1, start=1))
    monkeypatch.setattr(_claim, "os", DeniedOs())
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options='ready = "rename"'), tmp_path
    )
    caplog.set_level(logging.WARNING)
    async with Bus(config) as bus:
        drop(inbox / "secret.jsonl", jsonl(1))
        drop(inbox / "good.jsonl", jsonl(1, start=2))
        await wait_for_files(inbox / "done", ["b-orphan.jsonl", "good.jsonl"])
        await wait_for_files(
            inbox / "failed",
            [
                "a-secret-orphan.jsonl",
                "a-secret-orphan.jsonl.error",
                "secret.jsonl",
                "secret.jsonl.error",
            ],
        )
        assert bus.metrics.stats[0].errors == {"unreadable": 2}
        assert file_source(bus).files.failed == 2
    assert names(inbox / "processing") == []
    assert "cannot open it: Permission denied" in (inbox / "failed/secret.jsonl.error").read_text()
    logged = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("secret.jsonl cannot be opened: Permission denied") for line in logged
    )
    numbers = sorted(orjson.loads(m.data)["n"] for m in await messages_of(nc, f"IN_{unique}"))
    assert numbers == [1, 2]


async def test_links_and_fifos_in_the_inbox_are_reported_and_left_alone(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (tmp_path / "elsewhere.jsonl").write_bytes(jsonl(2))
    (inbox / "link.jsonl").symlink_to(tmp_path / "elsewhere.jsonl")
    (inbox / "loop.jsonl").symlink_to(inbox / "loop.jsonl")
    os.mkfifo(inbox / "pipe.jsonl")
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options='ready = "rename"'), tmp_path
    )
    caplog.set_level(logging.WARNING)
    async with Bus(config) as bus:
        drop(inbox / "good.jsonl", jsonl(1))
        await wait_for_files(inbox / "done", ["good.jsonl"])
        errors = dict(bus.metrics.stats[0].errors)
    assert errors == {"not_a_file": 3}
    logged = sorted(r.getMessage() for r in caplog.records if "not a regular" in r.getMessage())
    assert len(logged) == 3, logged
    assert logged[0].startswith(f"link.jsonl in {inbox} is a symbolic link, not a regular file")
    assert logged[1].startswith(f"loop.jsonl in {inbox} is a symbolic link")
    assert logged[2].startswith(f"pipe.jsonl in {inbox} is a FIFO")
    assert sorted(p.name for p in inbox.iterdir() if not p.is_dir()) == [
        "link.jsonl",
        "loop.jsonl",
        "pipe.jsonl",
    ]
    assert [orjson.loads(m.data)["n"] for m in await messages_of(nc, f"IN_{unique}")] == [1]


def test_an_entry_that_is_not_a_file_is_reported_once_while_it_stays(tmp_path: Path) -> None:
    tracker = ReadyTracker(
        tmp_path, patterns=["*"], mode="rename", stable_for=0.0, marker_suffix=".done"
    )
    (tmp_path / "sub").mkdir()  # a directory: passed over silently (processing/ is one)
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    assert tracker.scan() == []
    assert tracker.scan() == []
    assert tracker.refused == [("loop", "a symbolic link")]
    tracker.refused.clear()
    (tmp_path / "loop").unlink()
    assert tracker.scan() == []
    (tmp_path / "loop").symlink_to(tmp_path / "loop")  # back again: reported again
    assert tracker.scan() == []
    assert tracker.refused == [("loop", "a symbolic link")]


async def test_an_inbox_that_is_a_symlink_loop_refuses_to_start_in_one_line(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    loop = tmp_path / "inbox"
    loop.symlink_to(loop)
    config = decode_test_config(source_config(nats_server, unique, loop), tmp_path)
    with pytest.raises((StartupError, BaseExceptionGroup)) as raised:
        async with Bus(config):
            pass
    error: BaseException = raised.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert isinstance(error, StartupError)
    assert f"cannot use inbox {loop}: Too many levels of symbolic links" in str(error)


async def test_whole_files_are_one_message_with_their_metadata_and_deleted_when_done(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    options = 'ready = "rename"\nformat = "whole"\non_done = "delete"\nmax_size = 4096'
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options=options), tmp_path
    )
    payload = bytes(range(256)) * 4
    async with Bus(config) as bus:
        drop(inbox / "scan.pdf", payload)
        drop(inbox / "huge.bin", b"x" * 5000)
        await wait_for_files(inbox / "failed", ["huge.bin", "huge.bin.error"])

        async def deleted() -> bool:
            return file_source(bus).files.done == 1

        await eventually(deleted)
    assert names(inbox) == []
    assert not (inbox / "done").exists()
    messages = await messages_of(nc, f"IN_{unique}")
    assert [m.data for m in messages] == [payload]
    assert header(messages[0], "Busway-File-Size") == "1024"
    assert header(messages[0], "Content-Type") == "application/pdf"
    assert header(messages[0], "Busway-File-Mtime").endswith("Z")
    assert "larger than max_size" in (inbox / "failed" / "huge.bin.error").read_text()


async def test_an_inbox_that_cannot_be_a_directory_refuses_to_start(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    # Tests run as root, where chmod cannot deny access; a path under a regular file is
    # refused to root as well (ENOTDIR), which is what a permission problem looks like here.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file")
    config = decode_test_config(source_config(nats_server, unique, blocker / "inbox"), tmp_path)
    with pytest.raises((StartupError, BaseExceptionGroup)) as raised:
        async with Bus(config):
            pass
    # The engine currently lets the source's StartupError out inside an exception group.
    error: BaseException = raised.value
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    assert isinstance(error, StartupError)
    assert f"cannot use inbox {blocker}/inbox: Not a directory" in str(error)


@pytest.mark.slow
def test_sigkill_mid_file_and_a_restart_store_exactly_the_files_lines(
    nats_server: NatsServer, unique: str, tmp_path: Path, daemons: Daemons
) -> None:
    total = 20_000
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "busway.toml"
    # A window of 2 slows publishing down enough for the kill to land mid-file; checkpoints
    # every 100 ms make the restart resume from one, and re-publish what followed it.
    options = 'ready = "rename"\nwindow = 2\ncheckpoint_every = "100ms"'
    config.write_text(source_config(nats_server, unique, inbox, options=options))
    padding = "x" * 60
    drop(
        inbox / "big.jsonl",
        b"".join(b'{"n": %d, "pad": "%s"}\n' % (i, padding.encode()) for i in range(1, total + 1)),
    )

    async def stored() -> int:
        client = await nats.connect(nats_server.url)
        try:
            return (await client.jetstream().stream_info(f"IN_{unique}")).state.messages
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await client.close()

    async def stored_lines() -> list[int]:
        client = await nats.connect(nats_server.url)
        try:
            return [
                orjson.loads(m.data)["n"] for m in await stream_messages(client, f"IN_{unique}")
            ]
        finally:
            await client.close()

    first = daemons.start(config)
    first.wait_ready()
    wait_for(lambda: anyio.run(stored) >= 3000, "3000 lines stored before the kill", timeout=60)
    first.kill()
    assert first.process.returncode == -signal.SIGKILL
    killed_at = anyio.run(stored)
    assert killed_at < total, "the kill must land mid-file"
    assert names(inbox / "processing") == ["big.jsonl"]

    second = daemons.start(config)
    second.wait_ready()
    wait_for(lambda: names(inbox / "done") == ["big.jsonl"], "the file done", timeout=120)
    assert "resuming big.jsonl" in second.output()
    lines = anyio.run(stored_lines)
    assert len(lines) == total
    assert sorted(lines) == list(range(1, total + 1))
    assert names(inbox / "processing") == []
    assert second.terminate() == 0
