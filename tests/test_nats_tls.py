"""TLS towards an external nats-server: server-only TLS, mTLS, names, and every way it fails.

Real nats-server processes with TLS configured in the test, certificates made in the test
(tests/tls_support.py). A Bus starts against each and routes a message; each misconfiguration
is refused at start-up, at once (not after `connect_timeout`), with one line saying what failed
and which `[nats]` key fixes it.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import anyio
import nats
import orjson
import pytest

from busway import Bus, Config, ConfigError, StartupError
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, eventually, free_port
from tests.tls_support import Pki, server_tls_block

pytestmark = pytest.mark.anyio


def config_text(url: str, tls: str) -> str:
    return (
        config_toml(
            url,
            # A long connect_timeout: a refused handshake must end the start at once.
            nats_options=f'{tls}\nconnect_timeout = "600s"',
            http="",
            streams=[stream_table("TLS", "tls.>")],
        )
        + """
[[routes]]
name = "forward"
from = "tls.in"
to = ["tls.out"]
"""
    )


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def tls_server(tmp_path: Path, block: str) -> NatsServer:
    store = tmp_path / "nats"
    store.mkdir()
    return NatsServer(store, extra_config=block)


@pytest.fixture
def server_only(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    """TLS required, no client certificate asked."""
    server = tls_server(tmp_path, server_tls_block(pki.server()))
    yield server
    server.stop()


@pytest.fixture
def mutual(tmp_path: Path, pki: Pki) -> Iterator[NatsServer]:
    """TLS required and a client certificate signed by the test CA (verify: true)."""
    server = tls_server(tmp_path, server_tls_block(pki.server(), client_ca=pki.ca))
    yield server
    server.stop()


def client_context(pki: Pki, *, client: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client:
        issued = pki.client("tester")
        context.load_cert_chain(str(issued.cert), str(issued.key))
    return context


async def route_one_message(bus: Bus, url: str, context: ssl.SSLContext) -> None:
    """Publish to the route's input as another TLS client; wait for the routed copy."""
    client = await nats.connect(url, tls=context)
    try:
        js = client.jetstream()
        await js.publish("tls.in", orjson.dumps({"n": 1}))

        async def routed() -> bool:
            return (await js.stream_info("TLS")).state.messages == 2

        await eventually(routed)
    finally:
        await client.close()
    assert bus.readiness()["nats"]


async def start_error(config: Config) -> str:
    """The one-line StartupError a bus gives for `config`, within 60 s (not connect_timeout)."""
    with anyio.fail_after(60), pytest.raises(StartupError) as caught:
        async with Bus(config):
            pass
    message = str(caught.value)
    assert "\n" not in message
    return message


async def test_tls_with_the_servers_ca_routes_messages(
    tmp_path: Path, pki: Pki, server_only: NatsServer
) -> None:
    config = decode_test_config(config_text(server_only.url, f'tls_ca = "{pki.ca}"'), tmp_path)
    async with Bus(config) as bus:
        await route_one_message(bus, server_only.url, client_context(pki))


async def test_a_server_signed_by_an_unknown_ca_is_refused_naming_tls_ca(
    tmp_path: Path, server_only: NatsServer
) -> None:
    other = Pki(tmp_path / "other")
    config = decode_test_config(config_text(server_only.url, f'tls_ca = "{other.ca}"'), tmp_path)
    message = await start_error(config)
    assert "not signed by a CA busway trusts" in message, message
    assert "[nats] tls_ca" in message, message
    # The system's trust store does not know a private CA either: a tls:// URL alone, or a
    # nats:// URL to a server that requires TLS.
    for url in (server_only.url.replace("nats://", "tls://"), server_only.url):
        message = await start_error(decode_test_config(config_text(url, ""), tmp_path))
        assert "not signed by a CA busway trusts" in message, message


async def test_a_certificate_for_another_name_is_refused_unless_tls_server_name_says_it(
    tmp_path: Path, pki: Pki
) -> None:
    server = tls_server(tmp_path, server_tls_block(pki.server("nats.internal")))
    try:
        tls = f'tls_ca = "{pki.ca}"'
        message = await start_error(decode_test_config(config_text(server.url, tls), tmp_path))
        assert "does not carry the name busway expects" in message, message
        assert "tls_server_name" in message, message

        named = f'{tls}\ntls_server_name = "nats.internal"'
        config = decode_test_config(config_text(server.url, named), tmp_path)
        async with Bus(config):
            pass
    finally:
        server.stop()


async def test_mtls_with_a_client_certificate_routes_messages(
    tmp_path: Path, pki: Pki, mutual: NatsServer
) -> None:
    issued = pki.client()
    tls = f'tls_ca = "{pki.ca}"\ntls_cert = "{issued.cert}"\ntls_key = "{issued.key}"'
    config = decode_test_config(config_text(mutual.url, tls), tmp_path)
    async with Bus(config) as bus:
        await route_one_message(bus, mutual.url, client_context(pki, client=True))


async def test_mtls_without_a_client_certificate_is_refused_naming_tls_cert(
    tmp_path: Path, pki: Pki, mutual: NatsServer
) -> None:
    config = decode_test_config(config_text(mutual.url, f'tls_ca = "{pki.ca}"'), tmp_path)
    message = await start_error(config)
    assert "TLS with NATS at" in message, message
    assert "tls_cert" in message, message


async def test_mtls_with_a_certificate_from_another_ca_is_refused(
    tmp_path: Path, pki: Pki, mutual: NatsServer
) -> None:
    stranger = Pki(tmp_path / "stranger").client()
    tls = f'tls_ca = "{pki.ca}"\ntls_cert = "{stranger.cert}"\ntls_key = "{stranger.key}"'
    message = await start_error(decode_test_config(config_text(mutual.url, tls), tmp_path))
    assert "refused busway's client certificate" in message, message


async def test_tls_handshake_first(tmp_path: Path, pki: Pki) -> None:
    server = tls_server(tmp_path, server_tls_block(pki.server(), handshake_first=True))
    try:
        tls = f'tls_ca = "{pki.ca}"\ntls_handshake_first = true'
        async with Bus(decode_test_config(config_text(server.url, tls), tmp_path)):
            pass
    finally:
        server.stop()


async def test_a_server_without_tls_gets_no_credentials_in_clear(tmp_path: Path, pki: Pki) -> None:
    """Configured for TLS, busway refuses a server that does not ask for it, before CONNECT."""
    server = tls_server(
        tmp_path, 'authorization { user: "busway", password: "s3cret-password" }\nlog_file: ""'
    )
    try:
        tls = f'tls_ca = "{pki.ca}"\nuser = "busway"\npassword = "s3cret-password"'
        message = await start_error(decode_test_config(config_text(server.url, tls), tmp_path))
        assert "does not offer TLS" in message, message
        # The server never saw busway's CONNECT: nothing signed in, nothing refused.
        assert "busway" not in server.log.read_text()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ('tls_ca = "missing-ca.pem"', "[nats] tls_ca file"),
        ('tls_ca = "not-pem.txt"', "no PEM certificate"),
        ('tls_cert = "not-pem.txt"\ntls_key = "not-pem.txt"', "[nats] tls_cert file"),
        ('tls_cert = "pki/client-busway.pem"\ntls_key = "missing.pem"', "[nats] tls_key file"),
        (
            'tls_cert = "pki/client-busway.pem"\ntls_key = "pki/server-key.pem"',
            "the key does not belong to the certificate",
        ),
    ],
)
async def test_a_bad_tls_file_is_a_config_error_naming_the_key(
    tmp_path: Path, pki: Pki, keys: str, expected: str
) -> None:
    pki.client()
    pki.server()
    (tmp_path / "not-pem.txt").write_text("hello\n")
    config = decode_test_config(config_text(f"nats://127.0.0.1:{free_port()}", keys), tmp_path)
    with anyio.fail_after(30), pytest.raises(ConfigError) as caught:
        async with Bus(config):
            pass
    assert expected in str(caught.value), caught.value
    assert "\n" not in str(caught.value)
