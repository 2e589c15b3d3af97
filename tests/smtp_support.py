"""An SMTP server the smtp tests run themselves: aiosmtpd on a free loopback port, in a thread.

It keeps every mail it accepted (`mails`) and answers recipients by their local part, so a test
chooses the server's answer through the address: `bounce...@` gets 550 (permanent),
`later...@` 451 (try again). With `tls=True` it offers STARTTLS with a self-signed certificate
for 127.0.0.1 (`ca_file` is that certificate), and with `users` it requires a login.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import threading
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import free_port

__all__ = ["MailServer", "Received", "self_signed"]


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate and key for 127.0.0.1, written to `directory`."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "smtp.crt", directory / "smtp.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclass
class Received:
    """One accepted mail: the envelope and the parsed message."""

    sender: str
    recipients: list[str]
    mail: EmailMessage
    tls: bool
    login: str | None


@dataclass
class _Handler:
    mails: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        local = address.split("@", 1)[0]
        if local.startswith("bounce"):
            return "550 5.1.1 no such mailbox"
        if local.startswith("later"):
            return "451 4.2.1 mailbox busy, try later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        mail = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(mail, EmailMessage)
        login = session.auth_data.login.decode() if session.authenticated else None
        tls = session.ssl is not None
        with self.lock:
            self.mails.append(
                Received(envelope.mail_from, list(envelope.rcpt_tos), mail, tls, login)
            )
        return "250 OK queued"


class MailServer:
    """aiosmtpd on 127.0.0.1:`port`; `stop()` / `start()` take it down and up on that port."""

    def __init__(
        self, directory: Path, *, tls: bool = False, users: dict[str, str] | None = None
    ) -> None:
        self.port = free_port()
        self.handler = _Handler()
        self.ca_file: Path | None = None
        self._kwargs: dict[str, Any] = {}
        if tls:
            self.ca_file, key = self_signed(directory)
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self.ca_file, key)
            self._kwargs.update(tls_context=context, require_starttls=True)
        if users is not None:
            accounts = dict(users)

            def authenticate(
                server: Any, session: Any, envelope: Any, mechanism: str, data: Any
            ) -> AuthResult:
                ok = (
                    isinstance(data, LoginPassword)
                    and accounts.get(data.login.decode()) == data.password.decode()
                )
                return AuthResult(success=ok, handled=False, auth_data=data)

            self._kwargs.update(
                authenticator=authenticate, auth_required=True, auth_require_tls=tls
            )
        self._controller: Controller | None = None
        self.start()

    @property
    def mails(self) -> list[Received]:
        with self.handler.lock:
            return list(self.handler.mails)

    def start(self) -> None:
        self._controller = Controller(
            self.handler, hostname="127.0.0.1", port=self.port, **self._kwargs
        )
        self._controller.start()

    def stop(self) -> None:
        if self._controller is not None:
            self._controller.stop()
            self._controller = None
