"""Key-based authentication to NATS works on a plain install (nats-py needs `nkeys` for it).

Two real servers: one listing an NKey user (`[nats] nkey_seed`), one in operator mode with a
memory resolver, whose user signs in with a `.creds` file (`[nats] credentials`): the keys and
JWTs are made in the test (tests/nats_keys.py). A Bus starts against each (connect, declare its
streams) and routes a message; a wrong key is refused at once, and a malformed file is a clear
start-up error instead of nats-py's endless read loop.
"""

from __future__ import annotations

from pathlib import Path

import anyio
import nats
import orjson
import pytest

from busway import Bus, Config, StartupError
from tests.configs import config_toml, stream_table
from tests.nats_keys import Operator, user_key
from tests.support import NatsServer, decode_test_config, eventually, free_port

pytestmark = pytest.mark.anyio


def config_text(url: str, auth: str) -> str:
    return (
        config_toml(
            url,
            nats_options=f'{auth}\nconnect_timeout = "600s"',
            http="",
            streams=[stream_table("AUTH", "auth.>")],
        )
        + """
[[routes]]
name = "forward"
from = "auth.in"
to = ["auth.out"]
"""
    )


async def start(config: Config) -> None:
    """Start a bus and stop it again (the tests expect the start to fail)."""
    async with Bus(config):
        pass


async def route_one_message(bus: Bus, url: str, **auth: str) -> None:
    """Publish to the route's input as another client of the same user; wait for its output."""
    client = await nats.connect(url, **auth)  # type: ignore[arg-type]
    try:
        js = client.jetstream()
        await js.publish("auth.in", orjson.dumps({"n": 1}))

        async def routed() -> bool:
            return (await js.stream_info("AUTH")).state.messages == 2

        await eventually(routed)
    finally:
        await client.close()
    assert bus.readiness()["nats"]


async def test_nkey_seed_signs_in_to_a_server_listing_nkey_users(tmp_path: Path) -> None:
    user = user_key()
    (tmp_path / "nats").mkdir()
    server = NatsServer(
        tmp_path / "nats", extra_config=f"authorization {{ users = [ {{ nkey: {user.public} }} ] }}"
    )
    (tmp_path / "user.nk").write_text(f"{user.seed}\n")
    try:
        config = decode_test_config(config_text(server.url, 'nkey_seed = "user.nk"'), tmp_path)
        async with Bus(config) as bus:
            await route_one_message(bus, server.url, nkeys_seed=str(tmp_path / "user.nk"))

        (tmp_path / "stranger.nk").write_text(f"{user_key().seed}\n")
        stranger = decode_test_config(
            config_text(server.url, 'nkey_seed = "stranger.nk"'), tmp_path
        )
        with anyio.fail_after(60):  # connect_timeout is 600 s: refused at once, not retried
            with pytest.raises(StartupError, match="refused busway's credentials"):
                await start(stranger)
    finally:
        server.stop()


async def test_a_creds_file_signs_in_to_an_operator_mode_server(tmp_path: Path) -> None:
    operator = Operator.new()
    (tmp_path / "nats").mkdir()
    server = NatsServer(tmp_path / "nats", extra_config=operator.server_config())
    creds = operator.write_creds(tmp_path / "busway.creds", user_key())
    try:
        config = decode_test_config(
            config_text(server.url, 'credentials = "busway.creds"'), tmp_path
        )
        async with Bus(config) as bus:
            await route_one_message(bus, server.url, user_credentials=str(creds))

        unsigned = Operator.new().write_creds(tmp_path / "other.creds", user_key())
        assert unsigned.exists()
        stranger = decode_test_config(
            config_text(server.url, 'credentials = "other.creds"'), tmp_path
        )
        with (
            anyio.fail_after(60),
            pytest.raises(StartupError, match="refused busway's credentials"),
        ):
            await start(stranger)
    finally:
        server.stop()


async def test_a_malformed_key_file_is_a_start_up_error(tmp_path: Path) -> None:
    (tmp_path / "jwt-only.creds").write_text("-----BEGIN NATS USER JWT-----\neyJ0\n")
    (tmp_path / "garbage.nk").write_text("not a seed\n")
    for auth, message in [
        ('credentials = "jwt-only.creds"', "is not a .creds file"),
        ('nkey_seed = "garbage.nk"', "holds no valid NKey user seed"),
        ('nkey_seed = "missing.nk"', "cannot read [nats] nkey_seed file"),
    ]:
        config = decode_test_config(config_text(f"nats://127.0.0.1:{free_port()}", auth), tmp_path)
        with anyio.fail_after(60), pytest.raises(StartupError) as caught:
            await start(config)
        assert message in str(caught.value), caught.value
