"""The `sftp` source and sink against a real OpenSSH server (tests/sftp_support.py).

The server's directory is on this machine, so a test puts files where the source polls and
reads what the sink wrote straight from the file system.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest

from busway import Message, RetryableError, StartupError, default_registry
from busway._config.plan import build_plan
from busway.adapters.sftp import SftpSink
from busway.testing import eventually, start_bus
from tests.sftp_support import SshServer
from tests.support import decode_test_config

pytestmark = pytest.mark.anyio

STREAMS = '[[streams]]\nname = "FILES"\nsubjects = ["files.>"]\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[SshServer]:
    server = SshServer(tmp_path / "sshd")
    yield server
    server.stop()


def source_toml(sshd: SshServer, folder: Path, extra: str = "", **server: Path) -> str:
    return (
        STREAMS
        + '\n[[sources]]\nname = "partner"\ntype = "sftp"\nsubject = "files.in"\n'
        + f'path = "{folder}"\nstable_for = "0s"\ninterval = "100ms"\n{extra}\n'
        + sshd.server_table(**server)
        + "\n"
    )


def sink_toml(sshd: SshServer, folder: Path, extra: str = "") -> str:
    return (
        STREAMS
        + '\n[[sinks]]\nname = "partner-out"\ntype = "sftp"\nfrom = "files.out"\n'
        + f'path = "{folder}"\n{extra}\n'
        + sshd.server_table()
        + "\n"
    )


def upload(folder: Path, name: str, lines: list[bytes]) -> Path:
    """A partner's upload: written under a dot-name, renamed into place whole."""
    staging = folder / f".{name}.part"
    staging.write_bytes(b"".join(line + b"\n" for line in lines))
    target = folder / name
    staging.rename(target)
    return target


def listing(folder: Path) -> list[str]:
    """The names of the regular files in `folder` (none if it does not exist yet)."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_file())


async def files_in(folder: Path, expected: list[str]) -> None:
    async def there() -> bool:
        return listing(folder) == expected

    await eventually(there, timeout=30)


# ------------------------------------------------------------------------------------- source


async def test_source_publishes_each_line_with_an_id_naming_the_remote_file(
    sshd: SshServer,
) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    async with (
        start_bus(source_toml(sshd, inbox)) as harness,
        harness.collect("files.>") as got,
    ):
        path = upload(inbox, "orders.jsonl", [b'{"n": 1}', b'{"n": 2}', b'{"n": 3}'])
        mtime = int(path.stat().st_mtime)
        stored = await got.wait(3, timeout=30)
        await files_in(inbox / "done", ["orders.jsonl"])
    assert [orjson.loads(m.data)["n"] for m in stored] == [1, 2, 3]
    assert [m.id for m in stored] == [
        f"partner:{inbox}/orders.jsonl@{mtime}:{n}" for n in (1, 2, 3)
    ]
    assert {m.headers["Busway-File"] for m in stored} == {f"{inbox}/orders.jsonl"}
    assert list((inbox / "processing").iterdir()) == []
    assert not (inbox / "orders.jsonl").exists()


async def test_source_dead_letters_a_bad_line_and_publishes_the_rest(sshd: SshServer) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    async with (
        start_bus(source_toml(sshd, inbox)) as harness,
        harness.collect("files.>") as got,
        harness.collect("busway.deadletter.>") as dead,
    ):
        upload(inbox, "mixed.jsonl", [b'{"n": 1}', b"{not json", b'{"n": 3}'])
        stored = await got.wait(2, timeout=30)
        [letter] = await dead.wait(1, timeout=30)
        await files_in(inbox / "done", ["mixed.jsonl"])
        stats = harness.stats("partner")
    assert [orjson.loads(m.data)["n"] for m in stored] == [1, 3]
    assert letter.headers["Busway-Error-Reason"] == "bad_line"
    assert letter.headers["Busway-Origin"] == f"{inbox}/mixed.jsonl:2"
    assert letter.data == b"{not json"
    assert stats.dead_lettered == 1


async def test_source_moves_a_failed_file_to_failed_with_the_reason(sshd: SshServer) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    async with start_bus(source_toml(sshd, inbox, 'on_error = "fail-file"')) as harness:
        upload(inbox, "bad.jsonl", [b'{"n": 1}', b"{not json"])
        await files_in(inbox / "failed", ["bad.jsonl", "bad.jsonl.error"])
        stored = await harness.stored("FILES")
    assert stored == []
    reason = (inbox / "failed" / "bad.jsonl.error").read_text()
    assert reason.startswith("line 2: not JSON"), reason


async def test_source_resumes_a_file_left_in_processing(sshd: SshServer) -> None:
    """A daemon that died after claiming a file left it in processing/: the next run
    publishes it, under the ids the first run would have used."""
    inbox = sshd.root / "outbox"
    (inbox / "processing").mkdir(parents=True)
    path = upload(inbox / "processing", "left.jsonl", [b'{"n": 1}', b'{"n": 2}'])
    mtime = int(path.stat().st_mtime)
    async with (
        start_bus(source_toml(sshd, inbox)) as harness,
        harness.collect("files.>") as got,
    ):
        stored = await got.wait(2, timeout=30)
        await files_in(inbox / "done", ["left.jsonl"])
    assert [m.id for m in stored] == [f"partner:{inbox}/left.jsonl@{mtime}:{n}" for n in (1, 2)]


async def test_source_waits_for_a_file_to_stop_growing(sshd: SshServer) -> None:
    """A partner writing in place: the file is taken whole, once it stopped changing."""
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    text = source_toml(sshd, inbox).replace('stable_for = "0s"', 'stable_for = "2s"')
    async with start_bus(text) as harness:
        growing = inbox / "slow.jsonl"
        growing.write_bytes(b'{"n": 1}\n')
        for n in range(2, 5):
            await writer_pause(0.2)  # the writer's pace, well inside stable_for
            append_line(growing, n)
        await files_in(inbox / "done", ["slow.jsonl"])
        stored = await harness.stored("FILES")
    assert [orjson.loads(m.data)["n"] for m in stored] == [1, 2, 3, 4]
    # Lines 1-4 of one file: had it been claimed while growing, the rest would have come as
    # a second file starting at line 1.
    assert [m.headers["Busway-File-Line"] for m in stored] == ["1", "2", "3", "4"]


def append_line(path: Path, n: int) -> None:
    with path.open("ab") as file:
        file.write(orjson.dumps({"n": n}) + b"\n")
    os.utime(path, (n * 1000, n * 1000))  # a new mtime whatever the clock's resolution


async def writer_pause(seconds: float) -> None:
    """Time passing between a writer's appends (it simulates the writer, it waits for
    nothing the test checks)."""
    await anyio.sleep(seconds)


async def test_source_refuses_to_start_on_a_host_key_mismatch(
    sshd: SshServer, tmp_path: Path
) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    other = SshServer(tmp_path / "other")  # another server's host key, recorded for this port
    other.stop()
    wrong = tmp_path / "wrong_known_hosts"
    wrong.write_text(other.known_hosts.read_text().replace(str(other.port), str(sshd.port)))
    with pytest.raises(StartupError, match="host key is not the one in known_hosts"):
        async with start_bus(source_toml(sshd, inbox, known_hosts=wrong)):
            pass


async def test_source_refuses_to_start_when_the_key_is_refused(
    sshd: SshServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    stranger = SshServer(tmp_path / "stranger")  # a key the server does not authorize
    stranger.stop()
    with pytest.raises(StartupError, match="refused the key") as caught:
        async with start_bus(source_toml(sshd, inbox, key=stranger.client_key)):
            pass
    secret = stranger.client_key.read_text().splitlines()[1]
    assert secret not in str(caught.value)
    assert secret not in caplog.text


async def test_source_waits_for_an_unreachable_server_then_publishes(
    sshd: SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    upload(inbox, "early.jsonl", [b'{"n": 1}'])
    sshd.stop()
    caplog.set_level(logging.WARNING)
    async with (
        start_bus(source_toml(sshd, inbox)) as harness,
        harness.collect("files.>") as got,
    ):
        assert "not reachable yet, will retry" in caplog.text
        sshd.start()
        stored = await got.wait(1, timeout=60)
    assert orjson.loads(stored[0].data) == {"n": 1}


async def test_source_rides_out_a_server_outage_and_loses_nothing(
    sshd: SshServer, caplog: pytest.LogCaptureFixture
) -> None:
    inbox = sshd.root / "outbox"
    inbox.mkdir()
    caplog.set_level(logging.WARNING)
    async with (
        start_bus(source_toml(sshd, inbox)) as harness,
        harness.collect("files.>") as got,
    ):
        upload(inbox, "before.jsonl", [b'{"n": 1}'])
        await got.wait(1, timeout=30)
        sshd.stop()  # the listener and the source's open session

        async def noticed() -> bool:
            return "poll failed, retrying" in caplog.text

        await eventually(noticed, timeout=30)
        assert harness.stats("partner").ready is False
        upload(inbox, "during.jsonl", [b'{"n": 2}', b'{"n": 3}'])
        sshd.start()
        stored = await got.wait(3, timeout=60)
        await files_in(inbox / "done", ["before.jsonl", "during.jsonl"])
        assert harness.stats("partner").ready is True
    assert sorted(orjson.loads(m.data)["n"] for m in stored) == [1, 2, 3]


# --------------------------------------------------------------------------------------- sink


def message(key: str, *, attempt: int = 1) -> Message:
    return Message(
        subject="files.out",
        data=orjson.dumps({"key": key}),
        headers={"Nats-Msg-Id": key},
        id=key,
        stream="FILES",
        sequence=1,
        attempt=attempt,
    )


async def test_sink_writes_each_message_whole_under_its_id(sshd: SshServer) -> None:
    outbox = sshd.root / "inbox"
    extra = 'name_template = "{header.Nats-Msg-Id}.json"'
    async with start_bus(sink_toml(sshd, outbox, extra)) as harness:
        for key in ("a-1", "b/2"):
            await harness.publish("files.out", {"key": key}, id=key)
        await files_in(outbox, ["a-1.json", "b_2.json"])
    assert orjson.loads((outbox / "b_2.json").read_bytes()) == {"key": "b/2"}
    assert [p.name for p in outbox.iterdir() if p.name.startswith(".")] == []


async def test_sink_fails_retryably_while_the_server_is_down_and_delivers_after(
    sshd: SshServer,
) -> None:
    outbox = sshd.root / "inbox"
    text = sink_toml(sshd, outbox).replace("port = ", 'connect_timeout = "2s", port = ')
    [(_, sink)] = build_plan(decode_test_config(text, sshd.directory), default_registry()).sinks
    assert isinstance(sink, SftpSink)
    await sink.open()
    await sink.write([message("one")])
    sshd.stop()
    with pytest.raises(RetryableError, match=r"connecting on sftp://.*(refused|failed)"):
        await sink.write([message("two")])
    assert not sink.ready()
    sshd.start()
    await sink.write([message("two", attempt=2)])
    assert sink.ready()
    await sink.close()
    assert sorted(p.name for p in outbox.iterdir()) == ["one", "two"]
