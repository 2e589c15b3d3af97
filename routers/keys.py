"""Key material for the `encrypt`, `decrypt`, `sign` and `verify` stages, loaded at start-up.

The config names where a key is (`file = "keys/2025-06.key"` or `env = "ORDERS_KEY"`), never
the key itself, so busway.toml can be shared and committed. Every key is read and checked when
the route compiles: a missing file, a key of the wrong length or a PEM of the wrong type is a
config error naming the key's id and where it was looked for, never a failure on the first
message. Nothing here puts key bytes into an error text.

Accepted forms:

* AES-256 keys (`encrypt`/`decrypt`): exactly 32 bytes, as 64 hex digits, as base64 (standard
  or URL-safe, padded or not), or as the 32 raw bytes of a file.
* HMAC-SHA256 secrets (`sign`/`verify` with `hmac-sha256`): at least 32 bytes, the file's or
  variable's content as it is (surrounding whitespace stripped).
* Ed25519 keys: PEM, a PKCS#8 private key (`sign`; `verify` accepts it too) or a
  SubjectPublicKeyInfo public key (`verify`). Encrypted PEMs are refused: keep the file
  readable only by busway instead.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

__all__ = [
    "AES_KEY_BYTES",
    "HMAC_MIN_BYTES",
    "KeyLoadError",
    "KeyRef",
    "aes_key",
    "ed25519_private_key",
    "ed25519_public_key",
    "hmac_secret",
]

AES_KEY_BYTES = 32
HMAC_MIN_BYTES = 32
_MAX_KEY_FILE = 64 * 1024  # a PEM is a few hundred bytes; refuse to read /dev/zero

_HEX = re.compile(r"^[0-9a-fA-F]+$")
_BASE64 = re.compile(r"^[A-Za-z0-9+/_-]+={0,2}$")


class KeyLoadError(ValueError):
    """A key cannot be loaded or has the wrong form; the text names its id and location."""


class KeyRef:
    """Where one key is: its id (carried in envelopes and signatures) and its file or variable.

    `resolve_path` makes a relative `file` absolute against the config file's directory;
    `environ` is the environment to read `env` from (the process's by default).
    """

    __slots__ = ("env", "file", "id")

    def __init__(self, id: str, *, file: Path | None = None, env: str | None = None) -> None:
        self.id = id
        self.file = file
        self.env = env

    @property
    def where(self) -> str:
        """`file /etc/busway/k1.key` or `environment variable ORDERS_KEY`, for errors."""
        return f"file {self.file}" if self.file is not None else f"environment variable {self.env}"

    def read(self, environ: Mapping[str, str] | None = None) -> bytes:
        """The raw content (a file's bytes, a variable's text); KeyLoadError if missing."""
        if self.file is not None:
            try:
                with self.file.open("rb") as handle:
                    data = handle.read(_MAX_KEY_FILE + 1)
            except OSError as exc:
                raise KeyLoadError(
                    f"key {self.id!r}: cannot read {self.where}: {exc.strerror or exc}"
                ) from None
            if len(data) > _MAX_KEY_FILE:
                raise KeyLoadError(f"key {self.id!r}: {self.where} is too large to be a key")
            if not data.strip():
                raise KeyLoadError(f"key {self.id!r}: {self.where} is empty")
            return data
        environ = os.environ if environ is None else environ
        value = environ.get(self.env or "")
        if not value:
            raise KeyLoadError(f"key {self.id!r}: {self.where} is not set (or empty)")
        return value.encode()


def aes_key(ref: KeyRef, environ: Mapping[str, str] | None = None) -> bytes:
    """The 32-byte AES-256 key at `ref`: hex, base64, or (files only) 32 raw bytes."""
    raw = ref.read(environ)
    text = raw.strip().decode("latin-1")
    key: bytes | None = None
    form = "raw"
    if _HEX.match(text) and len(text) % 2 == 0:
        key, form = bytes.fromhex(text), "hex"
    elif _BASE64.match(text):
        key, form = _b64(text.encode("ascii")), "base64"
    if key is not None and len(key) == AES_KEY_BYTES:
        return key
    if ref.file is not None and len(raw) == AES_KEY_BYTES:
        return raw
    size = f"{len(key)} bytes (read as {form})" if key is not None else f"{len(raw)} bytes"
    raise KeyLoadError(
        f"key {ref.id!r}: {ref.where} holds {size}; an AES-256 key is {AES_KEY_BYTES} bytes "
        f"(64 hex digits, base64, or a file of {AES_KEY_BYTES} raw bytes; e.g. "
        f"`head -c {AES_KEY_BYTES} /dev/urandom > key`)"
    )


def hmac_secret(ref: KeyRef, environ: Mapping[str, str] | None = None) -> bytes:
    """The HMAC-SHA256 secret at `ref`, as written (whitespace around it stripped)."""
    secret = ref.read(environ).strip()
    if len(secret) < HMAC_MIN_BYTES:
        raise KeyLoadError(
            f"key {ref.id!r}: {ref.where} holds {len(secret)} bytes; an HMAC-SHA256 secret "
            f"needs at least {HMAC_MIN_BYTES} (e.g. `openssl rand -hex 32`)"
        )
    return secret


def ed25519_private_key(ref: KeyRef, environ: Mapping[str, str] | None = None) -> Ed25519PrivateKey:
    """The Ed25519 private key in the PEM at `ref` (for `sign`)."""
    key = _pem(ref, environ, private=True)
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyLoadError(
            f"key {ref.id!r}: {ref.where} holds a {_kind(key)}, not an Ed25519 private key "
            "(`openssl genpkey -algorithm ed25519`)"
        )
    return key


def ed25519_public_key(ref: KeyRef, environ: Mapping[str, str] | None = None) -> Ed25519PublicKey:
    """The Ed25519 public key in the PEM at `ref` (a private key's public half is accepted)."""
    key = _pem(ref, environ, private=None)
    if isinstance(key, Ed25519PrivateKey):
        return key.public_key()
    if not isinstance(key, Ed25519PublicKey):
        raise KeyLoadError(
            f"key {ref.id!r}: {ref.where} holds a {_kind(key)}, not an Ed25519 public key "
            "(`openssl pkey -in private.pem -pubout`)"
        )
    return key


def _pem(ref: KeyRef, environ: Mapping[str, str] | None, *, private: bool | None) -> object:
    data = ref.read(environ).strip()
    loaders: list[Callable[[bytes], object]] = []
    if private is not False:
        loaders.append(lambda pem: serialization.load_pem_private_key(pem, password=None))
    if private is not True:
        loaders.append(serialization.load_pem_public_key)
    encrypted = b"ENCRYPTED" in data.split(b"\n", 1)[0]
    if encrypted:
        raise KeyLoadError(
            f"key {ref.id!r}: {ref.where} is an encrypted PEM; busway reads unencrypted keys "
            "(protect the file's permissions instead)"
        )
    for load in loaders:
        try:
            return load(data)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    wanted = "private key" if private else "public or private key" if private is None else "key"
    raise KeyLoadError(f"key {ref.id!r}: {ref.where} is not a PEM {wanted}")


def _kind(key: object) -> str:
    return (
        type(key)
        .__name__.lstrip("_")
        .replace("PrivateKey", " private key")
        .replace("PublicKey", " public key")
    )


def _b64(text: bytes) -> bytes | None:
    padded = text + b"=" * (-len(text) % 4)
    try:
        if b"-" in text or b"_" in text:
            return base64.urlsafe_b64decode(padded)
        return base64.b64decode(padded, validate=True)
    except (binascii.Error, ValueError):
        return None
