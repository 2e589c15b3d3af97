"""`kill -9` of a daemon mid-flow: after a restart every row is in the stream exactly once.

For each engine, one daemon runs both source modes: an incremental source over 6,000 rows and
an outbox of 1,500. It is killed while publishing; the restarted daemon re-reads from the last
stored watermark and re-claims the uncommitted outbox rows, and the stream's dedup drops what
the first one had already stored.
"""

from __future__ import annotations

import signal
from pathlib import Path

import anyio
import nats
import nats.js.errors
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.sql.engines import Engine
from tests.sql.helpers import watermark_of
from tests.support import Daemons, NatsServer, eventually, stream_messages

ROWS, OUTBOX = 6_000, 1_500


@pytest.mark.slow
@pytest.mark.anyio
async def test_sigkill_mid_flow_then_restart_loses_and_duplicates_no_row(
    engine: Engine,
    nats_server: NatsServer,
    tmp_path: Path,
    unique: str,
    daemons: Daemons,
) -> None:
    feed, box, stream = f"crash_{unique}", f"crashbox_{unique}", f"CRASH_{unique}"
    await engine.execute(f"CREATE TABLE {feed} (id bigint PRIMARY KEY, note text)")
    await engine.executemany(
        f"INSERT INTO {feed} (id, note) VALUES ({engine.marks(2)})",
        [(i, f"row {i}") for i in range(1, ROWS + 1)],
    )
    await engine.create_outbox(box)
    await engine.executemany(
        f"INSERT INTO {box} (subject, payload) VALUES ({engine.marks(2)})",
        [(f"crash{unique}.box", f'{{"n": {i}}}') for i in range(1, OUTBOX + 1)],
    )
    config = tmp_path / "crash.toml"
    config.write_text(
        config_toml(
            nats_server, streams=[stream_table(stream, f"crash{unique}.>", duplicate_window="10m")]
        )
        + f"""
[[sources]]
name = "feed{unique}"
type = "{engine.type}"
{engine.config()}
table = "{feed}"
subject = "crash{unique}.feed"
batch_size = 200
interval = "100ms"

[[sources]]
name = "box{unique}"
type = "{engine.type}"
{engine.config()}
mode = "outbox"
table = "{box}"
subject = "{{subject}}"
batch_size = 100
interval = "100ms"
"""
    )
    client = await nats.connect(nats_server.url)
    js = client.jetstream()

    async def stored() -> int:
        try:
            return (await js.stream_info(stream)).state.messages
        except nats.js.errors.NotFoundError:
            return 0

    async def some_stored() -> bool:
        return await stored() >= 2_000

    async def done() -> bool:
        [(left,)] = await engine.fetch(f"SELECT count(*) FROM {box}")
        try:
            entry = await (await js.key_value("busway_state")).get(f"feed{unique}.watermark")
        except nats.js.errors.KeyNotFoundError:
            return False
        return left == 0 and watermark_of(entry.value) == f'[["int","{ROWS}"]]'.encode()

    try:
        first = daemons.start(config)
        await anyio.to_thread.run_sync(first.wait_ready)
        await eventually(some_stored, timeout=60)
        first.kill()
        assert first.process.returncode == -signal.SIGKILL
        assert await stored() < ROWS + OUTBOX, "the kill must land mid-flow"

        second = daemons.start(config)
        await anyio.to_thread.run_sync(second.wait_ready)
        await eventually(done, timeout=120)
        second.process.send_signal(signal.SIGTERM)
        assert await anyio.to_thread.run_sync(second.process.wait, 40) == 0, second.output()

        found = [
            (m.subject, orjson.loads(m.data).get("id") or orjson.loads(m.data)["n"])
            for m in await stream_messages(client, stream)
        ]
    finally:
        await client.close()
    assert len(found) == ROWS + OUTBOX
    assert sorted(n for subject, n in found if subject.endswith(".feed")) == list(
        range(1, ROWS + 1)
    )
    assert sorted(n for subject, n in found if subject.endswith(".box")) == list(
        range(1, OUTBOX + 1)
    )
