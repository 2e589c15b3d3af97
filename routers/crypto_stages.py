"""The `encrypt`, `decrypt`, `sign` and `verify` stages, compiled into steps.

Keys are loaded here, at start-up (`busway.routers.keys`); a key that does not load is a
`StageCompileError` naming the stage, the key's id and its file or variable. At run time a
failure to decrypt or verify is a permanent `RoutingError` (reason `decrypt` or `signature`):
retrying cannot make a tampered message whole, so it is dead-lettered at once, with a
`Busway-Crypto-Failure` header (`tampered`, `unknown-key`, `malformed`, `bad-signature`,
`missing`) and a reason that names the field and key id, never a key or the plaintext.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from busway.routers.context import MessageContext
from busway.routers.crypto import Algorithm, CryptoFailure, Keyring, Signer, Verifier, canonical
from busway.routers.keys import (
    KeyLoadError,
    KeyRef,
    aes_key,
    ed25519_private_key,
    ed25519_public_key,
    hmac_secret,
)
from busway.routers.paths import Path as BodyPath
from busway.routers.paths import PathError, parse_path
from busway.routers.pipeline import Item, Output, RoutingError, Step
from busway.routers.stages import CryptoStage, KeySource, SignatureStage

__all__ = ["CRYPTO_FAILURE_HEADER", "CryptoStageError", "decrypt", "encrypt", "sign", "verify"]

#: The header on a dead letter saying why decryption or verification failed.
CRYPTO_FAILURE_HEADER = "Busway-Crypto-Failure"
DEFAULT_SIGNATURE_HEADER = "Busway-Signature"

_T = TypeVar("_T")


class CryptoStageError(ValueError):
    """A crypto stage does not compile; `field` is where (`stages[1].encrypt.keys[0]`)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


def _refs(keys: list[KeySource], resolve_path: Callable[[str], Path]) -> list[KeyRef]:
    return [
        KeyRef(key.id, file=resolve_path(key.file) if key.file is not None else None, env=key.env)
        for key in keys
    ]


def _load(
    keys: list[KeySource],
    resolve_path: Callable[[str], Path],
    load: Callable[[KeyRef], _T],
    field: str,
) -> dict[str, _T]:
    loaded: dict[str, _T] = {}
    for index, ref in enumerate(_refs(keys, resolve_path)):
        where = f"{field}.keys[{index}].{'file' if ref.file is not None else 'env'}"
        try:
            loaded[ref.id] = load(ref)
        except KeyLoadError as exc:
            raise CryptoStageError(where, str(exc)) from None
    return loaded


def _paths(fields: list[str], field: str) -> list[BodyPath]:
    parsed = []
    for index, text in enumerate(fields):
        try:
            parsed.append(parse_path(text))
        except PathError as exc:
            raise CryptoStageError(f"{field}.fields[{index}]", str(exc)) from None
    return parsed


def _failure(kind: str, field: str, where: str, exc: CryptoFailure) -> RoutingError:
    return RoutingError(
        kind,
        f"{field}: {where}: {exc}",
        stage=field,
        headers={CRYPTO_FAILURE_HEADER: exc.cause},
    )


def encrypt(spec: CryptoStage, field: str, resolve_path: Callable[[str], Path]) -> Step:
    """Replace each of `fields` (or the whole body) by an envelope under the first key."""
    keyring = Keyring(_load(spec.keys, resolve_path, aes_key, field))
    paths = _paths(spec.fields, field)

    def encrypt_step(items: list[Item], _c: MessageContext | None, _o: list[Output]) -> list[Item]:
        for item in items:
            if not paths:
                item.document = keyring.encrypt(item.document, "@")
                continue
            for path in paths:
                try:
                    found, value = path.pop(item.document)
                    if found:
                        path.set(item.document, keyring.encrypt(value, path.text))
                except PathError as exc:
                    raise RoutingError("encrypt", f"{field}: {exc}", stage=field) from None
        return items

    return encrypt_step, False


def decrypt(spec: CryptoStage, field: str, resolve_path: Callable[[str], Path]) -> Step:
    """Open the envelopes at `fields` (or the whole body) with whichever listed key sealed it."""
    keyring = Keyring(_load(spec.keys, resolve_path, aes_key, field))
    paths = _paths(spec.fields, field)

    def decrypt_step(items: list[Item], _c: MessageContext | None, _o: list[Output]) -> list[Item]:
        for item in items:
            if not paths:
                try:
                    item.document = keyring.decrypt(item.document, "@")
                except CryptoFailure as exc:
                    raise _failure("decrypt", field, "the body", exc) from None
                continue
            for path in paths:
                try:
                    found, value = path.pop(item.document)
                    if found:
                        path.set(item.document, keyring.decrypt(value, path.text))
                except PathError as exc:
                    raise RoutingError("decrypt", f"{field}: {exc}", stage=field) from None
                except CryptoFailure as exc:
                    raise _failure("decrypt", field, f"field {path.text!r}", exc) from None
        return items

    return decrypt_step, False


def _signature_place(spec: SignatureStage) -> tuple[str | None, str | None]:
    """(header, field): exactly one is set."""
    if spec.field is not None:
        return None, spec.field
    return spec.header or DEFAULT_SIGNATURE_HEADER, None


def sign(spec: SignatureStage, field: str, resolve_path: Callable[[str], Path]) -> Step:
    """Sign each body's canonical form with the first key into the header or field."""
    algorithm = cast(Algorithm, spec.algorithm)
    first = spec.keys[:1]
    if algorithm == "ed25519":
        keys: dict[str, Any] = _load(first, resolve_path, ed25519_private_key, field)
    else:
        keys = _load(first, resolve_path, hmac_secret, field)
    kid, key = next(iter(keys.items()))
    signer = Signer(algorithm, kid, key)
    header, body_field = _signature_place(spec)

    def sign_step(items: list[Item], _c: MessageContext | None, _o: list[Output]) -> list[Item]:
        for item in items:
            signature = signer.sign(canonical(item.document, without=body_field))
            if body_field is not None:
                if not isinstance(item.document, dict):
                    raise RoutingError(
                        "signature",
                        f"{field}: cannot put the signature in field {body_field!r}: the body "
                        "is not a JSON object",
                        stage=field,
                    )
                item.document[body_field] = signature
            else:
                assert header is not None
                headers = item.headers if item.headers is not None else {}
                headers[header] = signature
                item.headers = headers
        return items

    return sign_step, False


def verify(spec: SignatureStage, field: str, resolve_path: Callable[[str], Path]) -> Step:
    """Check each body's signature (header or field) against any listed key; a signature
    field is removed once checked (a header stays: inherited headers cannot be dropped)."""
    algorithm = cast(Algorithm, spec.algorithm)
    if algorithm == "ed25519":
        keys: dict[str, Any] = _load(spec.keys, resolve_path, ed25519_public_key, field)
    else:
        keys = _load(spec.keys, resolve_path, hmac_secret, field)
    verifier = Verifier(algorithm, keys)
    header, body_field = _signature_place(spec)

    def signature_of(item: Item, ctx: MessageContext | None) -> object:
        if body_field is not None:
            document = item.document
            return document.get(body_field) if isinstance(document, dict) else None
        assert header is not None
        if item.headers and header in item.headers:  # signed earlier in this route
            return item.headers[header]
        return ctx.headers.get(header) if ctx is not None and ctx.headers else None

    where = f"field {body_field!r}" if body_field is not None else f"header {header}"

    def verify_step(items: list[Item], ctx: MessageContext | None, _o: list[Output]) -> list[Item]:
        for item in items:
            value = signature_of(item, ctx)
            try:
                if value is None:
                    raise CryptoFailure("missing", "no signature")
                verifier.verify(canonical(item.document, without=body_field), value)
            except CryptoFailure as exc:
                raise _failure("signature", field, where, exc) from None
            if body_field is not None:
                # The body goes on as it was signed: a signature checked is spent, and the
                # stage before (a `verify` of an outer signature) sees what it expects.
                del item.document[body_field]
        return items

    return verify_step, False
