"""The `smtp` sink against a real SMTP server (aiosmtpd, tests/smtp_support.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from busway import (
    BatchError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    StartupError,
    default_registry,
)
from busway._config.plan import build_plan
from busway.adapters.smtp import SmtpSink
from busway.testing import eventually, start_bus
from tests.smtp_support import MailServer
from tests.support import decode_test_config

pytestmark = pytest.mark.anyio

STREAMS = '[[streams]]\nname = "MAIL"\nsubjects = ["mail.>"]\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def smtpd(tmp_path: Path) -> Iterator[MailServer]:
    server = MailServer(tmp_path)
    yield server
    server.stop()


def sink_toml(server: MailServer, extra: str = "") -> str:
    return (
        STREAMS
        + '\n[[sinks]]\nname = "mailer"\ntype = "smtp"\nfrom = "mail.out"\n'
        + f'host = "127.0.0.1"\nport = {server.port}\nsecurity = "none"\n'
        + 'sender = "Busway <busway@example.com>"\nto = ["{header.To}"]\n'
        + 'subject = "Order {body.order} is {body.state}"\n'
        + 'message_id_domain = "bus.example"\ntimeout = "5s"\n'
        + extra
        + "\n"
    )


def build(text: str, base_dir: Path) -> Sink:
    [(_, sink)] = build_plan(decode_test_config(text, base_dir), default_registry()).sinks
    assert isinstance(sink, SmtpSink)
    return sink


def message(key: str, to: str = "ops@example.com", *, attempt: int = 1) -> Message:
    return Message(
        subject="mail.out",
        data=orjson.dumps({"order": key, "state": "late"}),
        headers={"Nats-Msg-Id": key, "To": to},
        id=key,
        stream="MAIL",
        sequence=1,
        attempt=attempt,
    )


async def test_a_message_becomes_a_templated_mail_through_a_running_bus(
    smtpd: MailServer,
) -> None:
    body = '\nbody = "Order {body.order} ({header.Nats-Msg-Id}) is {body.state}."'
    async with start_bus(sink_toml(smtpd, body)) as harness:
        await harness.publish(
            "mail.out",
            {"order": "A-17", "state": "late"},
            id="orders:17",
            headers={"To": "ops@example.com"},
        )

        async def sent() -> bool:
            return len(smtpd.mails) == 1

        await eventually(sent, timeout=30)
    [received] = smtpd.mails
    assert received.sender == "busway@example.com"
    assert received.recipients == ["ops@example.com"]
    assert received.mail["Subject"] == "Order A-17 is late"
    assert received.mail["Message-ID"] == "<busway.orders%3A17@bus.example>"
    assert received.mail.get_content().rstrip() == "Order A-17 (orders:17) is late."


async def test_a_redelivered_message_carries_the_same_message_id(
    smtpd: MailServer, tmp_path: Path
) -> None:
    sink = build(sink_toml(smtpd), tmp_path)
    await sink.open()
    await sink.write([message("m-1")])
    await sink.write([message("m-1", attempt=2)])
    await sink.close()
    ids = [received.mail["Message-ID"] for received in smtpd.mails]
    assert ids == ["<busway.m-1@bus.example>"] * 2
    assert smtpd.mails[0].mail.get_content() == smtpd.mails[1].mail.get_content()


async def test_a_permanent_refusal_dead_letters_only_that_message(
    smtpd: MailServer, tmp_path: Path
) -> None:
    sink = build(sink_toml(smtpd), tmp_path)
    batch = [message("ok-1"), message("gone", to="bounce@example.com"), message("ok-2")]
    with pytest.raises(BatchError) as caught:
        await sink.write(batch)
    [(index, error)] = caught.value.failures.items()
    assert index == 1
    assert isinstance(error, PermanentError)
    assert "550" in str(error)
    assert "no such mailbox" in str(error)
    assert [r.mail["Subject"] for r in smtpd.mails] == ["Order ok-1 is late", "Order ok-2 is late"]


async def test_a_temporary_refusal_is_retried(smtpd: MailServer, tmp_path: Path) -> None:
    sink = build(sink_toml(smtpd), tmp_path)
    with pytest.raises(BatchError) as caught:
        await sink.write([message("busy", to="later@example.com")])
    [error] = caught.value.failures.values()
    assert isinstance(error, RetryableError)
    assert "451" in str(error)
    assert smtpd.mails == []


async def test_a_missing_template_field_dead_letters_with_its_name(
    smtpd: MailServer, tmp_path: Path
) -> None:
    sink = build(sink_toml(smtpd), tmp_path)
    odd = Message(
        subject="mail.out",
        data=b'{"order": "A-1"}',
        headers={"To": "ops@example.com"},
        id="odd",
        stream="MAIL",
        sequence=1,
        attempt=1,
    )
    with pytest.raises(BatchError) as caught:
        await sink.write([odd])
    [error] = caught.value.failures.values()
    assert isinstance(error, PermanentError)
    assert "{body.state}" in str(error)
    assert "missing" in str(error)


async def test_starttls_and_login_are_used(tmp_path: Path) -> None:
    server = MailServer(tmp_path, tls=True, users={"busway": "s3cret-pw"})
    try:
        text = sink_toml(server).replace('security = "none"', 'security = "starttls"')
        text += f'ca_file = "{server.ca_file}"\nusername = "busway"\npassword = "s3cret-pw"\n'
        sink = build(text, tmp_path)
        await sink.open()
        await sink.write([message("secure")])
    finally:
        server.stop()
    [received] = server.mails
    assert (received.tls, received.login) == (True, "busway")


async def test_a_refused_login_stops_start_up_without_showing_the_password(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = MailServer(tmp_path, tls=True, users={"busway": "right-pw"})
    try:
        text = sink_toml(server).replace('security = "none"', 'security = "starttls"')
        text += f'ca_file = "{server.ca_file}"\nusername = "busway"\npassword = "wrong-pw"\n'
        sink = build(text, tmp_path)
        with pytest.raises(StartupError, match="refused the login of 'busway'") as caught:
            await sink.open()
    finally:
        server.stop()
    assert "wrong-pw" not in str(caught.value)
    assert "wrong-pw" not in caplog.text


async def test_an_untrusted_certificate_is_refused(tmp_path: Path) -> None:
    server = MailServer(tmp_path, tls=True)
    try:
        text = sink_toml(server).replace('security = "none"', 'security = "starttls"')
        sink = build(text, tmp_path)  # no ca_file: the self-signed certificate is unknown
        with pytest.raises(RetryableError, match="CERTIFICATE_VERIFY_FAILED"):
            await sink.write([message("m")])
    finally:
        server.stop()
    assert server.mails == []


async def test_a_server_down_is_retried_and_delivered_once_it_is_back(
    smtpd: MailServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    smtpd.stop()
    sink = build(sink_toml(smtpd), tmp_path)
    caplog.set_level(logging.WARNING)
    await sink.open()  # not fatal: the server may come back
    assert "not reachable yet" in caplog.text
    assert not sink.ready()
    with pytest.raises(RetryableError, match=r"connecting to smtp://127\.0\.0\.1"):
        await sink.write([message("wait")])
    smtpd.start()
    await sink.write([message("wait", attempt=2)])
    assert sink.ready()
    assert [r.mail["Message-ID"] for r in smtpd.mails] == ["<busway.wait@bus.example>"]
