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


async def bodies(nc: NatsClient, stream: str) -> list[dict[str, object]]:
    """The JSON bodies of every message in `stream`, in order."""
    return [orjson.loads(m.data) for m in await stream_messages(nc, stream)]


async def messages(nc: NatsClient, stream: str) -> list[Msg]:
    """Every message in `stream`, in order."""
    return await stream_messages(nc, stream)


async def count(nc: NatsClient, stream: str) -> int:
    """How many messages `stream` holds."""
    return (await nc.jetstream().stream_info(stream)).state.messages
