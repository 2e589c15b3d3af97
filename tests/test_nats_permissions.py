"""The embedded nats-server secured (`[nats.embedded]`), and NATS permissions busway lacks.

The embedded server with TLS and authorization: busway signs in with its own NKey, allowed only
the subjects its config uses; a device listed in `users` publishes what it may and nothing
else; anonymous and plain-text clients are refused. Against an external server whose user
lacks a subject busway publishes to, the violation is a clear log line, the message is not
lost, and nothing hangs.
"""

from __future__ import annotations

import logging
import ssl
import stat
from pathlib import Path
from typing import Any

import anyio
import nats
import nats.errors
import orjson
import pytest

from busway import Bus, ConfigError, StartupError
from busway._nats.embedded import embedded_seed_file
from busway.testing import start_bus
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, eventually, free_port, run_cli
from tests.tls_support import Pki

pytestmark = pytest.mark.anyio

ROUTE = """
[[routes]]
name = "forward"
from = "tls.in"
to = ["tls.out"]
"""

DEVICE_PASSWORD = "device-password-1234"


def embedded_config(
    tmp_path: Path, pki: Pki, *, extra_nats: str = "", embedded: str = "", listen: str | None = None
) -> str:
    server = pki.server()
    return (
        config_toml(
            None,
            data_dir=tmp_path / "store",
            **({"nats_listen": listen} if listen else {}),
            http="",
            streams=[stream_table("TLS", "tls.>")],
            nats_options=(
                f"{extra_nats}\n[nats.embedded]\n"
                f'tls_cert = "{server.cert}"\ntls_key = "{server.key}"\n{embedded}\n'
                "[[nats.embedded.users]]\n"
                f'user = "device"\npassword = "{DEVICE_PASSWORD}"\n'
                'publish = ["tls.in"]\nsubscribe = ["_INBOX.>"]\n'
            ),
        )
        + ROUTE
    )


class Violations:
    """A NATS client's asynchronous errors, as nats-py reports them."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    async def record(self, exc: Exception) -> None:
        self.errors.append(str(exc))

    async def wait_for(self, text: str) -> None:
        async def reported() -> bool:
            return any(text in error for error in self.errors)

        await eventually(reported, timeout=10)


async def connect(url: str, **options: Any) -> nats.NATS:
    return await nats.connect(
        url, allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=5, **options
    )


async def connect_and_flush(url: str, **options: Any) -> None:
    """Connect and round-trip once: with TLS 1.3 a refused client certificate is only seen
    after the handshake, on the first read."""
    client = await connect(url, **options)
    try:
        await client.flush(timeout=5)
    finally:
        await client.close()


async def test_embedded_server_with_tls_and_users_routes_what_each_may_use(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    config = decode_test_config(embedded_config(tmp_path, pki), tmp_path)
    context = ssl.create_default_context(cafile=str(pki.ca))
    async with Bus(config) as bus:
        assert bus.nats_url.startswith("tls://")
        seed_file = embedded_seed_file(tmp_path / "store")
        for secret in (seed_file, tmp_path / "store" / "nats-server.conf"):
            assert stat.S_IMODE(secret.stat().st_mode) == 0o600, secret

        # The device publishes the route's input, with a PubAck (its inbox is allowed).
        device_errors = Violations()
        device = await connect(
            bus.nats_url,
            tls=context,
            user="device",
            password=DEVICE_PASSWORD,
            error_cb=device_errors.record,
        )
        # busway's own user, as the operator commands on this host sign in.
        own_errors = Violations()
        own = await connect(
            bus.nats_url, tls=context, nkeys_seed=str(seed_file), error_cb=own_errors.record
        )
        try:
            await device.jetstream().publish("tls.in", orjson.dumps({"n": 1}))

            async def routed() -> bool:
                return (await own.jetstream().stream_info("TLS")).state.messages == 2

            await eventually(routed)

            # The device may not publish where busway's route writes, nor read it.
            await device.publish("tls.out", b"forged")
            await device.subscribe("tls.>")
            await device_errors.wait_for('permissions violation for publish to "tls.out"')
            await device_errors.wait_for('permissions violation for subscription to "tls.>"')
            # busway's user subscribes to its inboxes only: reading the data is denied.
            await own.subscribe("tls.>")
            await own_errors.wait_for('permissions violation for subscription to "tls.>"')
            assert (await own.jetstream().stream_info("TLS")).state.messages == 2
        finally:
            await device.close()
            await own.close()

        # No credentials, or no TLS: refused.
        with pytest.raises((nats.errors.Error, OSError)):
            await connect(bus.nats_url, tls=context)
        plain = bus.nats_url.replace("tls://", "nats://")
        with pytest.raises((nats.errors.Error, OSError)):
            await connect(plain, user="device", password=DEVICE_PASSWORD, tls_handshake_first=False)


async def test_operator_commands_reach_a_secured_embedded_server(tmp_path: Path) -> None:
    """`busway dlq` on the daemon's host signs in with busway's key (`busway.nk`), over TLS."""
    pki = Pki(tmp_path / "pki")
    path = tmp_path / "busway.toml"
    path.write_text(embedded_config(tmp_path, pki, listen=f"127.0.0.1:{free_port()}", embedded=""))
    config = decode_test_config(path.read_text(), tmp_path)
    async with Bus(config):
        listed = await anyio.to_thread.run_sync(run_cli, "dlq", "list", str(path))
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[-1] == "0 dead letter(s)"


async def test_embedded_server_with_mtls_requires_client_certificates(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    issued = pki.client("busway")
    text = embedded_config(
        tmp_path,
        pki,
        extra_nats=f'tls_cert = "{issued.cert}"\ntls_key = "{issued.key}"',
        embedded=f'tls_client_ca = "{pki.ca}"',
    )
    config = decode_test_config(text, tmp_path)
    async with Bus(config) as bus:
        without = ssl.create_default_context(cafile=str(pki.ca))
        with pytest.raises((nats.errors.Error, OSError, ssl.SSLError)):
            await connect_and_flush(
                bus.nats_url, tls=without, user="device", password=DEVICE_PASSWORD
            )
        device = ssl.create_default_context(cafile=str(pki.ca))
        device_cert = pki.client("device")
        device.load_cert_chain(str(device_cert.cert), str(device_cert.key))
        client = await connect(bus.nats_url, tls=device, user="device", password=DEVICE_PASSWORD)
        try:
            await client.jetstream().publish("tls.in", b"{}")
        finally:
            await client.close()


async def test_a_subject_busways_user_may_not_publish_is_a_clear_error_not_a_hang(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """busway's NATS user lacks the route's output subject: one clear log line per refusal,
    the input is kept (redelivered, not acknowledged), and the daemon keeps serving."""
    store = tmp_path / "nats"
    store.mkdir()
    allowed = '["tls.in", "$JS.API.>", "$JS.ACK.>", "$KV.>", "_INBOX.>", "busway.dlq.>"]'
    server = NatsServer(
        store,
        extra_config=(
            'authorization { users = [ { user: "busway", password: "busway-password", '
            f"permissions: {{ publish: {{ allow: {allowed} }}, "
            'subscribe: { allow: ["_INBOX.>"] } } }, '
            '{ user: "admin", password: "admin-password" } ] }'
        ),
    )
    try:
        text = (
            config_toml(
                server,
                http="",
                publish_timeout="1s",
                streams=[stream_table("TLS", "tls.>")],
                nats_options='user = "busway"\npassword = "busway-password"',
            )
            + ROUTE
        )
        caplog.set_level(logging.ERROR, logger="busway.nats")
        async with Bus(decode_test_config(text, tmp_path)):
            admin = await connect(server.url, user="admin", password="admin-password")
            try:
                with anyio.fail_after(60):
                    await admin.jetstream().publish("tls.in", b'{"n": 1}')

                    async def denied() -> bool:
                        return any(
                            "NATS denied busway" in r.getMessage() and '"tls.out"' in r.getMessage()
                            for r in caplog.records
                        )

                    await eventually(denied)
                info = await admin.jetstream().stream_info("TLS")
                assert info.state.messages == 1  # nothing written where busway may not write
                consumers = await admin.jetstream().consumers_info("TLS")
                kept = sum(c.num_ack_pending + c.num_pending for c in consumers)
                assert kept == 1  # the input is not acknowledged: redelivered once granted
            finally:
                await admin.close()
    finally:
        server.stop()


async def test_the_testing_kit_runs_a_bus_on_a_secured_embedded_server(tmp_path: Path) -> None:
    """`start_bus` publishes and reads as busway's own user, over TLS."""
    pki = Pki(tmp_path / "pki")
    server = pki.server()
    text = f"""
[nats.embedded]
tls_cert = "{server.cert}"
tls_key = "{server.key}"
authorization = true

[[streams]]
name = "TLS"
subjects = ["tls.>"]
{ROUTE}"""
    async with start_bus(text, directory=tmp_path / "bus") as harness:
        assert harness.nats_url.startswith("tls://")
        async with harness.collect("tls.out") as got:
            await harness.publish("tls.in", {"n": 1})
            [message] = await got.wait(1)
        assert orjson.loads(message.data) == {"n": 1}


@pytest.mark.parametrize(
    ("embedded", "nats_keys", "expected"),
    [
        ('tls_cert = "a.pem"', "", "TLS needs both `tls_cert` and `tls_key`"),
        ('tls_client_ca = "ca.pem"', "", "tls_client_ca needs TLS"),
        (
            'tls_cert = "a.pem"\ntls_key = "k.pem"\ntls_client_ca = "ca.pem"',
            "",
            "set `tls_cert` and `tls_key` for busway's own connection",
        ),
        ('[[nats.embedded.users]]\nuser = "d"', "", "give one of `password` and `nkey`"),
        (
            '[[nats.embedded.users]]\nuser = "d"\nnkey = "SUABC"',
            "",
            "nkey must be an NKey user public key",
        ),
        (
            '[[nats.embedded.users]]\nuser = "d"\npassword = "p\\"w"',
            "",
            "without quotes, backslashes or control characters",
        ),
        (
            '[[nats.embedded.users]]\nuser = "d"\npassword = "pw"\npublish = ["a..b"]',
            "",
            "'a..b' is not a subject",
        ),
    ],
)
def test_a_bad_embedded_security_table_is_a_config_error(
    tmp_path: Path, embedded: str, nats_keys: str, expected: str
) -> None:
    text = config_toml(
        None,
        http="",
        nats_options=f"{nats_keys}\n[nats.embedded]\n{embedded}\n",
    )
    with pytest.raises(ConfigError) as caught:
        decode_test_config(text, tmp_path)
    assert expected in str(caught.value), caught.value
    assert " at $.nats" in str(caught.value), caught.value


async def test_an_unreadable_embedded_certificate_is_a_start_up_error_naming_the_key(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    server = pki.server()
    text = config_toml(
        None,
        data_dir=tmp_path / "store",
        http="",
        nats_options=f'[nats.embedded]\ntls_cert = "{server.cert}"\ntls_key = "missing-key.pem"',
    )
    with anyio.fail_after(60), pytest.raises(StartupError) as caught:
        async with Bus(decode_test_config(text, tmp_path)):
            pass
    assert "cannot read [nats.embedded] tls_key file" in str(caught.value), caught.value
