"""Certificates made in the test with `cryptography`: a CA, server and client certificates.

Each `Pki` is one private CA; a second `Pki` is "another CA" (what a stranger's certificate or
a wrong `tls_ca` is signed by). Files are PEM, written under the directory given.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


class Pki:
    """A private CA in `directory` that issues server and client certificates."""

    def __init__(self, directory: Path, name: str = "busway test CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(self._key, hashes.SHA256())
        )
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _issue(
        self, stem: str, common_name: str, san: list[x509.GeneralName], usage: x509.ObjectIdentifier
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        cert_path = self.directory / f"{stem}.pem"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return Issued(cert=cert_path, key=_write_key(self.directory / f"{stem}-key.pem", key))

    def server(self, *names: str) -> Issued:
        """A server certificate for `names` (IP addresses or DNS names; default 127.0.0.1)."""
        san: list[x509.GeneralName] = []
        for name in names or ("127.0.0.1",):
            try:
                san.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                san.append(x509.DNSName(name))
        return self._issue("server", "nats-server", san, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, name: str = "busway") -> Issued:
        """A client certificate (mTLS) with common name `name`."""
        return self._issue(f"client-{name}", name, [], ExtendedKeyUsageOID.CLIENT_AUTH)


def server_tls_block(
    server: Issued, *, client_ca: Path | None = None, handshake_first: bool = False
) -> str:
    """nats-server config lines requiring TLS (and client certificates signed by `client_ca`)."""
    lines = [
        "tls {",
        f'  cert_file: "{server.cert}"',
        f'  key_file: "{server.key}"',
        "  timeout: 5",  # a loaded test machine: the 0.5 s default fails handshakes
    ]
    if client_ca is not None:
        lines += [f'  ca_file: "{client_ca}"', "  verify: true"]
    if handshake_first:
        lines.append("  handshake_first: true")
    return "\n".join([*lines, "}"])
