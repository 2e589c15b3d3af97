"""The HTTP listener: HTTPS with a configured certificate, and busway mounted in another app."""

from __future__ import annotations

import datetime
import socket
import ssl
from pathlib import Path

import anyio
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from busway import Bus, ConfigError, StartupError
from busway._ingress.listener import Listener
from tests.configs import FREE, config_toml, stream_table
from tests.support import NatsServer, decode_test_config, free_port

pytestmark = pytest.mark.anyio


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "busway-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(__import__("ipaddress").ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def http_config(server: NatsServer, unique: str, listen: str, options: str = "") -> str:
    """An `http` source on `/orders`; the listener on `listen`, with more `[http]` options."""
    return (
        config_toml(
            server,
            http=listen,
            http_options=options,
            streams=[stream_table(f"IN_{unique}", f"in{unique}.>")],
        )
        + f"""
[[sources]]
name = "api{unique}"
type = "http"
path = "/orders"
subject = "in{unique}.orders"
"""
    )


async def test_tls_listener_serves_https_only(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    self_signed(tmp_path)
    config = decode_test_config(
        http_config(
            nats_server,
            unique,
            FREE,
            'tls_cert = "cert.pem"\ntls_key = "key.pem"',
        ),
        tmp_path,
    )
    trust = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    async with Bus(config) as bus:
        base = f"127.0.0.1:{bus.http_port}"
        async with httpx.AsyncClient(verify=trust) as client:
            health = await client.get(f"https://{base}/healthz")
            posted = await client.post(f"https://{base}/orders", json={"id": 1})
            with pytest.raises(httpx.HTTPError):
                await client.get(f"http://{base}/healthz")
    assert health.status_code == 200
    assert posted.status_code == 202


async def test_a_bad_certificate_is_a_startup_error(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    config = decode_test_config(
        http_config(
            nats_server,
            unique,
            FREE,
            'tls_cert = "cert.pem"\ntls_key = "key.pem"',
        ),
        tmp_path,
    )
    with pytest.raises(StartupError, match=r"cannot load the TLS certificate .*cert\.pem"):
        async with Bus(config):
            pass


async def test_busway_mounted_in_an_application(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(http_config(nats_server, unique, FREE), tmp_path)
    bus = Bus(config, serve_http=False)

    async def home(_: object) -> PlainTextResponse:
        return PlainTextResponse("the application")

    app = Starlette(routes=[Route("/", home), Mount("/bus", app=bus.asgi)])
    port = free_port()
    listener = Listener(app, f"127.0.0.1:{port}")
    async with anyio.create_task_group() as tg:
        await tg.start(listener.run)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            before = await client.get("/bus/healthz")
            async with bus:
                assert bus.http_port is None  # busway bound nothing itself
                own = await client.get("/")
                posted = await client.post("/bus/orders", json={"id": 1})
                ready = await client.get("/bus/readyz")
            after = await client.get("/bus/healthz")
        listener.stop()
    assert before.status_code == 503 and before.headers["Retry-After"] == "1"
    assert own.text == "the application"
    assert posted.status_code == 202
    assert ready.status_code == 200
    assert after.status_code == 503


async def test_an_empty_listen_turns_the_listener_off(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    text = config_toml(nats_server, http="")
    async with Bus(decode_test_config(text, tmp_path)) as bus:
        assert bus.http_port is None
        assert bus.app is None
    with_source = decode_test_config(http_config(nats_server, unique, ""), tmp_path)
    with pytest.raises(ConfigError, match=r"\[http\] listen is not set"):
        async with Bus(with_source):
            pass


def test_the_listening_socket_says_tcp_so_responses_are_not_held_by_nagle() -> None:
    # asyncio turns TCP_NODELAY on for accepted sockets only when the listening socket's
    # `proto` is IPPROTO_TCP; with proto 0 every response waited ~44 ms for a delayed ACK.
    listener = Listener(Starlette(), f"127.0.0.1:{free_port()}")
    listener.bind()
    try:
        assert [s.proto for s in listener._sockets] == [socket.IPPROTO_TCP]
    finally:
        listener.close()
