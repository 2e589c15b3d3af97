"""Helpers for the file adapter tests: configs, file writers, reading what landed where."""

from __future__ import annotations

import os
from pathlib import Path

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Bus
from busway.adapters.file import FileSource
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, stream_messages


def source_config(
    server: NatsServer, unique: str, inbox: Path, *, options: str = "", name: str = "inbox"
) -> str:
    """A config with one `file` source on `inbox` publishing to `in<unique>.files`."""
    return (
        config_toml(server, streams=[stream_table(f"IN_{unique}", f"in{unique}.>")])
        + f"""
[[sources]]
name = "{name}{unique}"
type = "file"
path = "{inbox}"
subject = "in{unique}.files"
rescan = "1s"
{options}
"""
    )


def drop(path: Path, data: bytes) -> Path:
    """Write `data` under a dot-name beside `path`, then rename it into place (complete)."""
    temporary = path.with_name(f".{path.name}.part")
    temporary.write_bytes(data)
    os.rename(temporary, path)
    return path


def jsonl(count: int, *, start: int = 1) -> bytes:
    """`count` JSON lines `{"n": i}`."""
    return b"".join(b'{"n": %d}\n' % i for i in range(start, start + count))


def file_source(bus: Bus) -> FileSource:
    """The bus's (first) file source object, to read its file counters."""
    source = bus.plan.sources[0][1]
    assert isinstance(source, FileSource)
    return source


def names(folder: Path) -> list[str]:
    """Sorted names of the files in `folder` (dot-files included), [] if it does not exist."""
    return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


async def messages_of(nc: NatsClient, stream: str) -> list[Msg]:
    """Every message of `stream` (empty if it holds none)."""
    if (await nc.jetstream().stream_info(stream)).state.messages == 0:
        return []
    return await stream_messages(nc, stream)


def header(message: Msg, name: str) -> str:
    """Header `name` of `message` (the test fails if it is missing)."""
    assert message.headers is not None and name in message.headers, (name, message.headers)
    return message.headers[name]


def append(path: Path, data: bytes) -> None:
    """Append `data` to `path`, opening and closing it (as a logger or a torn write would)."""
    with open(path, "ab") as file:
        file.write(data)


def tree(folder: Path) -> list[str]:
    """Every file under `folder`, as sorted paths relative to it."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
