"""The cryptography behind the `encrypt`/`decrypt` and `sign`/`verify` stages.

Everything is done by the `cryptography` library; this module only decides the formats.

**Envelope** (AES-256-GCM). An encrypted value, a field or the whole body, is replaced by

    {"v": 1, "alg": "A256GCM", "kid": "2025-06", "iv": "<base64url, 12 bytes>",
     "ct": "<base64url: ciphertext and 16-byte tag>"}

The plaintext is the value's compact JSON, so a number stays a number after `decrypt`. The
nonce is random per encryption. The associated data binds the ciphertext to its key id and its
place (`busway:A256GCM:<kid>:<path>`, path `@` for the whole body): a ciphertext copied to
another field, or relabelled with another key id, fails to decrypt like a tampered one.

**Signature** (Ed25519 or HMAC-SHA256) over the body's canonical form: its JSON with object
keys sorted (at every depth), no whitespace, UTF-8 unescaped (`orjson` with `OPT_SORT_KEYS`).
Carried as `<kid>:<base64url signature>`, in a header or a top-level field; a field holding the
signature is left out of the signed form.

Failures are `CryptoFailure`s with a `cause` (`malformed`, `unknown-key`, `tampered`,
`bad-signature`, `missing`); their text never holds key material or plaintext.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Mapping
from typing import Any, Literal

import orjson
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "ALGORITHMS",
    "ENVELOPE_ALG",
    "CryptoFailure",
    "Keyring",
    "Signer",
    "Verifier",
    "canonical",
]

ENVELOPE_ALG = "A256GCM"
_ENVELOPE_KEYS = frozenset({"v", "alg", "kid", "iv", "ct"})
_NONCE_BYTES = 12
_TAG_BYTES = 16

Algorithm = Literal["ed25519", "hmac-sha256"]
ALGORITHMS: tuple[Algorithm, ...] = ("ed25519", "hmac-sha256")

Cause = Literal["malformed", "unknown-key", "tampered", "bad-signature", "missing"]


class CryptoFailure(Exception):
    """A value cannot be decrypted or a signature does not verify; `cause` says why."""

    def __init__(self, cause: Cause, message: str) -> None:
        self.cause = cause
        super().__init__(message)


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: object, what: str) -> bytes:
    if not isinstance(text, str):
        raise CryptoFailure("malformed", f"{what} is not a string")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise CryptoFailure("malformed", f"{what} is not base64url") from None


def canonical(document: Any, *, without: str | None = None) -> bytes:
    """The signed form of `document`: sorted-key compact JSON, top-level `without` left out."""
    if without is not None and isinstance(document, dict) and without in document:
        document = {key: value for key, value in document.items() if key != without}
    return orjson.dumps(document, option=orjson.OPT_SORT_KEYS)


class Keyring:
    """AES-256-GCM keys by id: the first encrypts, any of them decrypts (key rotation)."""

    def __init__(self, keys: Mapping[str, bytes]) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        self._ciphers = {kid: AESGCM(key) for kid, key in keys.items()}
        self.current = next(iter(keys))

    def encrypt(self, value: Any, path: str) -> dict[str, Any]:
        """The envelope of `value` (any JSON value) at `path`, under the current key."""
        kid = self.current
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._ciphers[kid].encrypt(nonce, orjson.dumps(value), _aad(kid, path))
        return {"v": 1, "alg": ENVELOPE_ALG, "kid": kid, "iv": _b64e(nonce), "ct": _b64e(sealed)}

    def decrypt(self, envelope: Any, path: str) -> Any:
        """The JSON value sealed in `envelope` at `path`; CryptoFailure if it cannot be."""
        if not isinstance(envelope, dict) or envelope.keys() != _ENVELOPE_KEYS:
            raise CryptoFailure(
                "malformed",
                "not an encryption envelope (an object with exactly v, alg, kid, iv, ct)",
            )
        if envelope["v"] != 1 or envelope["alg"] != ENVELOPE_ALG:
            raise CryptoFailure("malformed", f"envelope version/algorithm is not 1/{ENVELOPE_ALG}")
        kid = envelope["kid"]
        cipher = self._ciphers.get(kid) if isinstance(kid, str) else None
        if cipher is None:
            raise CryptoFailure(
                "unknown-key",
                f"key id {_shown(kid)} is not among the stage's keys ({', '.join(self._ciphers)})",
            )
        nonce = _b64d(envelope["iv"], "iv")
        sealed = _b64d(envelope["ct"], "ct")
        if len(nonce) != _NONCE_BYTES or len(sealed) < _TAG_BYTES:
            raise CryptoFailure("malformed", "iv or ct has the wrong length")
        try:
            plain = cipher.decrypt(nonce, sealed, _aad(kid, path))
        except InvalidTag:
            raise CryptoFailure(
                "tampered",
                f"authentication failed under key {kid!r}: the ciphertext, its key id or its "
                "place was altered, or it was sealed with another key of the same id",
            ) from None
        try:
            return orjson.loads(plain)
        except orjson.JSONDecodeError:
            raise CryptoFailure("malformed", "the decrypted value is not JSON") from None


def _aad(kid: str, path: str) -> bytes:
    return f"busway:{ENVELOPE_ALG}:{kid}:{path}".encode()


def _shown(value: object) -> str:
    """A key id from a message, quoted and cut short: it comes from the sender."""
    text = repr(value)
    return text if len(text) <= 40 else text[:39] + "…"


class Signer:
    """Signs canonical bodies with one key: `<kid>:<base64url signature>`."""

    def __init__(self, algorithm: Algorithm, kid: str, key: Ed25519PrivateKey | bytes) -> None:
        self.algorithm = algorithm
        self.kid = kid
        self._key = key

    def sign(self, data: bytes) -> str:
        """The signature value for `data`."""
        if isinstance(self._key, Ed25519PrivateKey):
            signature = self._key.sign(data)
        else:
            mac = hmac.HMAC(self._key, hashes.SHA256())
            mac.update(data)
            signature = mac.finalize()
        return f"{self.kid}:{_b64e(signature)}"


class Verifier:
    """Checks `<kid>:<signature>` values against any of its keys (key rotation)."""

    def __init__(self, algorithm: Algorithm, keys: Mapping[str, Ed25519PublicKey | bytes]) -> None:
        self.algorithm = algorithm
        self._keys = dict(keys)

    def verify(self, data: bytes, value: object) -> None:
        """Return if `value` signs `data`; CryptoFailure otherwise."""
        if not isinstance(value, str) or ":" not in value:
            raise CryptoFailure("malformed", "the signature is not `<key id>:<base64url>`")
        kid, _, encoded = value.rpartition(":")
        key = self._keys.get(kid)
        if key is None:
            raise CryptoFailure(
                "unknown-key",
                f"key id {_shown(kid)} is not among the stage's keys ({', '.join(self._keys)})",
            )
        signature = _b64d(encoded, "the signature")
        try:
            if isinstance(key, Ed25519PublicKey):
                key.verify(signature, data)
            else:
                mac = hmac.HMAC(key, hashes.SHA256())
                mac.update(data)
                mac.verify(signature)  # constant-time comparison
        except InvalidSignature:
            raise CryptoFailure(
                "bad-signature",
                f"the {self.algorithm} signature under key {kid!r} does not match the body",
            ) from None
