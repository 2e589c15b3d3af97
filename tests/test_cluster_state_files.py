"""Two daemons on one file: the append sink and the directory source with N daemons.

Append sink: before the per-file lock, each daemon appended at its own idea of the file's
end, overwriting the other's lines (lost acknowledged messages, corrupted lines). Directory
source: claim-by-rename (atomic on one file system) plus a lock on the claimed file already
made each file one daemon's; the test keeps that true.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import anyio.lowlevel
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.files_support import drop, file_source, jsonl, messages_of, names, source_config
from tests.support import NatsServer, decode_test_config, eventually, wait_settled

pytestmark = pytest.mark.anyio


def append_sink_config(server: NatsServer, unique: str, path: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "APP_{unique}"
subjects = ["app{unique}.>"]

[[sinks]]
name = "file{unique}"
type = "file"
from = "app{unique}.>"
path = "{path}"
batch_size = 200
rotate_bytes = 40000
retry = {{ max_attempts = 50, backoff = "50ms", max_backoff = "100ms" }}
"""


async def test_two_daemons_appending_to_one_file_write_every_message_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    total = 20_000
    config = decode_test_config(append_sink_config(nats_server, unique, "out/all.jsonl"), tmp_path)
    js = nc.jetstream()
    async with Bus(config) as first, Bus(config) as second:
        for start in range(0, total, 1_000):
            acks = [
                await js.publish_async(f"app{unique}.x", orjson.dumps({"n": i}))
                for i in range(start, start + 1_000)
            ]
            for ack in acks:
                await ack
        await wait_settled(nc, f"APP_{unique}", f"busway-sink-file{unique}", timeout=120)
        written = [bus.metrics.stats[0].published for bus in (first, second)]
    assert all(written), f"one daemon wrote everything, the test proves nothing: {written}"
    out = tmp_path / "out"
    files = sorted(path for path in out.iterdir() if path.suffix == ".jsonl")
    assert len(files) > 2, "rotations must have happened while both daemons wrote"
    numbers = []
    for path in files:
        for line in path.read_bytes().splitlines():
            numbers.append(orjson.loads(line)["n"])  # a corrupted line fails here
    assert sorted(numbers) == list(range(total)), (
        f"{len(numbers)} lines, {len(set(numbers))} distinct, missing "
        f"{len(set(range(total)) - set(numbers))}"
    )


async def test_two_daemons_on_one_inbox_publish_every_file_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    files, lines = 40, 50
    config = decode_test_config(
        source_config(nats_server, unique, inbox, options='stable_for = "50ms"'), tmp_path
    )
    async with Bus(config) as first, Bus(config) as second:
        for n in range(files):  # files keep arriving while both daemons watch
            drop(inbox / f"part{n:03}.jsonl", jsonl(lines, start=n * lines))
            await anyio.lowlevel.checkpoint()

        async def all_done() -> bool:
            return len(names(inbox / "done")) == files

        await eventually(all_done, timeout=60)
        published = [bus.metrics.stats[0].published for bus in (first, second)]
        claimed = [file_source(bus).files.claimed for bus in (first, second)]
    found = await messages_of(nc, f"IN_{unique}")
    numbers = sorted(orjson.loads(m.data)["n"] for m in found)
    assert numbers == list(range(files * lines))
    # Each file was claimed by one daemon: the claims add up to the files, the records too.
    assert sum(claimed) == files, claimed
    assert sum(published) == files * lines, published
    assert names(inbox / "processing") == []
