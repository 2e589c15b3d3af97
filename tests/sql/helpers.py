"""Config text and stream reads shared by the database tests."""

from __future__ import annotations

import orjson
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from tests.configs import config_toml, stream_table
from tests.sql.engines import Engine
from tests.support import NatsServer, stream_messages


def bus_config(server: NatsServer, stream: str, subjects: str, body: str) -> str:
    """A config on the test nats-server with one stream and the given sources/sinks."""
    return config_toml(
        server, streams=[stream_table(stream, subjects, duplicate_window="10m")], body=body
    )


def source_table(engine: Engine, name: str, extra: str = "", **keys: str) -> str:
    """A `[[sources]]` table for `engine`; `keys` are TOML values written as given."""
    lines = "\n".join(f"{key} = {value}" for key, value in keys.items())
    return f"""
[[sources]]
name = "{name}"
type = "{engine.type}"
{engine.config()}
{lines}
{extra}
"""


def watermark_of(value: bytes | None) -> bytes:
    """The watermark pairs of a stored watermark value, as the source encoded them.

    The value is `{"fence": <lease token>, "watermark": [[type, text], ...]}`; the fence is
    checked by the cluster tests, the pairs here.
    """
    if not value:
        return b""
    document = orjson.loads(value)
    assert isinstance(document, dict) and isinstance(document["fence"], int), document
    assert document["fence"] > 0, document
    return orjson.dumps(document["watermark"])


async def bodies(nc: NatsClient, stream: str) -> list[dict[str, object]]:
    """The JSON bodies of every message in `stream`, in order."""
    return [orjson.loads(m.data) for m in await stream_messages(nc, stream)]


async def messages(nc: NatsClient, stream: str) -> list[Msg]:
    """Every message in `stream`, in order."""
    return await stream_messages(nc, stream)


async def count(nc: NatsClient, stream: str) -> int:
    """How many messages `stream` holds."""
    return (await nc.jetstream().stream_info(stream)).state.messages
