"""Operator commands read only what they need of the config: no adapter's secrets.

`busway status` and `busway dlq` run on an operator's shell, where a partner's token that only
the HTTP sink sends (`${PARTNER_TOKEN}`) is not set. They need `[nats]`, `[http]`,
`[dead_letter]` and the component list, so that is all they resolve.
"""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, Config, ConfigError, default_registry
from busway._config.model import decode_config
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, eventually, run_cli

pytestmark = pytest.mark.anyio


def config_text(server: NatsServer, unique: str, secret: str) -> str:
    return (
        config_toml(
            server, dead_letter=unique, streams=[stream_table(f"IN_{unique}", f"in{unique}.>")]
        )
        + f"""
[[routes]]
name = "shape{unique}"
from = "in{unique}.orders"
transform = "{{id: id}}"
to = ["in{unique}.shaped"]
stages = [{{ set_headers = {{ X-Partner = "${{{secret}}}" }} }}]

[[sinks]]
name = "partner{unique}"
type = "http"
from = "in{unique}.shaped"
url = "https://partner.example/orders"
headers = {{ Authorization = "Bearer ${{{secret}}}" }}

[[sinks]]
name = "mirror{unique}"
type = "mysql"
from = "in{unique}.shaped"
dsn = "${{file:/nonexistent/{secret}}}"
table = "orders"
columns = {{ id = "id" }}
"""
    )


def decode(text: str, tmp_path: Path, environ: dict[str, str], *, outline: bool = False) -> Config:
    registry = default_registry()
    return decode_config(
        text,
        file="busway.toml",
        base_dir=str(tmp_path),
        source_types=registry.source_config,
        sink_types=registry.sink_config,
        environ=environ,
        **({"outline": True} if outline else {}),
    )


def test_outline_leaves_adapter_secrets_and_route_logic_unresolved(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    text = config_text(nats_server, unique, f"PARTNER_TOKEN_{unique}")
    with pytest.raises(ConfigError, match=f"environment variable PARTNER_TOKEN_{unique}"):
        decode(text, tmp_path, {})
    config = decode(text, tmp_path, {}, outline=True)
    assert [(s.name, s.from_) for s in config.sinks] == [
        (f"partner{unique}", f"in{unique}.shaped"),
        (f"mirror{unique}", f"in{unique}.shaped"),
    ]
    assert config.dead_letter_subject(config.sinks[0]) == f"dl{unique}.partner{unique}"
    assert config.nats.servers == [nats_server.url]
    # What the command needs is still resolved, and still refused when missing.
    needs = text.replace("[nats]\n", '[nats]\nuser = "ops"\npassword = "${NATS_PASSWORD}"\n')
    with pytest.raises(ConfigError, match="environment variable NATS_PASSWORD is not set"):
        decode(needs, tmp_path, {}, outline=True)


async def test_status_and_dlq_work_without_an_adapters_secret(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    secret = f"PARTNER_TOKEN_{unique}"
    assert secret not in os.environ
    text = config_text(nats_server, unique, secret)
    text = text[: text.index('[[sinks]]\nname = "mirror')]  # no database in this test
    path = tmp_path / "busway.toml"
    path.write_text(text)
    # The daemon has the secret; the operator's shell (the subprocesses below) does not.
    config = decode(text, tmp_path, {**os.environ, secret: "s3cret"})
    async with Bus(config) as bus:
        await nc.jetstream().publish(f"in{unique}.orders", b"not json")

        async def dead_lettered() -> bool:
            info = await nc.jetstream().stream_info(f"DL_{unique}")
            return info.state.messages == 1

        await eventually(dead_lettered)
        path.write_text(
            text.replace('listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{bus.http_port}"')
        )

        # In threads: the bus in this event loop answers the commands.
        status = await anyio.to_thread.run_sync(run_cli, "status", str(path), "--json")
        listed = await anyio.to_thread.run_sync(run_cli, "dlq", "list", str(path), "--json")
        check = await anyio.to_thread.run_sync(run_cli, "check", str(path))

    assert status.returncode == 0, status.stderr
    assert {c["name"] for c in orjson.loads(status.stdout)["components"]} == {
        f"shape{unique}",
        f"partner{unique}",
    }
    assert listed.returncode == 0, listed.stderr
    letters = [orjson.loads(line) for line in listed.stdout.splitlines()]
    assert [(letter["component"], letter["reason"]) for letter in letters] == [
        (f"shape{unique}", "decode")
    ]
    # `busway check` (and `run`) still need every secret.
    assert check.returncode == 2
    assert f"environment variable {secret} is not set" in check.stderr
