"""Signing keys from a JWKS (file or URL), cached, refreshed, and looked up by `kid`.

Keys are reloaded every `refresh` and, when a token names a `kid` the cache does not know (the
issuer rotated its keys), at once, but at most once per `min_refresh`: a flood of tokens with
made-up `kid`s cannot turn into a flood of requests to the issuer. A failed reload keeps the
keys already known, so an issuer's outage does not lock out tokens signed with current keys.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import orjson
from jwt import PyJWK
from jwt.exceptions import PyJWKError

__all__ = ["JwksCache", "SigningKey"]

logger = logging.getLogger("busway.adapters.http.jwks")


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One usable key: its `kid`, key type (`RSA`, `EC`, `OKP`, `oct`), the `alg` it is
    pinned to (if the JWKS says), and the parsed key."""

    kid: str | None
    kty: str
    alg: str | None
    jwk: PyJWK


class JwksCache:
    """The keys of one JWKS; `find(kid)` refreshes as described in the module docstring."""

    def __init__(
        self,
        load: Callable[[], Awaitable[bytes]],
        *,
        where: str,
        refresh: float,
        min_refresh: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.where = where
        self.refresh_interval = refresh
        self.min_refresh = min_refresh
        self._clock = clock
        self._keys: dict[str | None, SigningKey] = {}
        self._loaded_at: float | None = None
        self._tried_at: float | None = None
        self._lock = anyio.Lock()
        self.last_error: str | None = None

    @classmethod
    def from_file(cls, path: Path, *, refresh: float, min_refresh: float) -> JwksCache:
        """Keys read from `path` (re-read on refresh, so a rotated file is picked up)."""
        return cls(
            lambda: anyio.Path(path).read_bytes(),
            where=str(path),
            refresh=refresh,
            min_refresh=min_refresh,
        )

    @property
    def loaded(self) -> bool:
        """True once a load succeeded."""
        return self._loaded_at is not None

    async def find(self, kid: str | None) -> SigningKey | None:
        """The key for `kid` (a token without `kid` matches a JWKS of exactly one key)."""
        now = self._clock()
        if self._loaded_at is None or now - self._loaded_at >= self.refresh_interval:
            await self.reload(force=False)
        key = self._lookup(kid)
        if key is None and self._may_retry(self._clock()):
            await self.reload(force=False)
            key = self._lookup(kid)
        return key

    async def reload(self, *, force: bool = True) -> None:
        """Load the JWKS now (once for concurrent callers); keep the old keys on failure."""
        started = self._clock()
        async with self._lock:
            if not force and self._tried_at is not None and self._tried_at >= started:
                return  # another caller reloaded while we waited
            if not force and not self._may_retry(self._clock()):
                return
            self._tried_at = self._clock()
            try:
                keys = parse_jwks(await self._load())
            except (OSError, ValueError) as exc:
                self.last_error = f"cannot load the JWKS from {self.where}: {exc}"
                logger.warning("%s; keeping %d known key(s)", self.last_error, len(self._keys))
                return
            self._keys = keys
            self._loaded_at = self._clock()
            self.last_error = None

    def _may_retry(self, now: float) -> bool:
        return self._tried_at is None or now - self._tried_at >= self.min_refresh

    def _lookup(self, kid: str | None) -> SigningKey | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)


def parse_jwks(data: bytes) -> dict[str | None, SigningKey]:
    """The signing keys of a JWKS document; ValueError if it has none usable.

    Keys marked `"use": "enc"` are skipped (they are not for signatures), and so are keys this
    installation cannot parse (an unknown curve), which are logged rather than fatal.
    """
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError('expected a JSON object with a "keys" array')  # noqa: TRY004
    keys: dict[str | None, SigningKey] = {}
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = PyJWK(entry)
        except PyJWKError as exc:
            logger.warning("skipping JWKS key %r: %s", entry.get("kid"), exc)
            continue
        kid = entry.get("kid") if isinstance(entry.get("kid"), str) else None
        alg = entry.get("alg") if isinstance(entry.get("alg"), str) else None
        keys[kid] = SigningKey(kid=kid, kty=str(entry.get("kty")), alg=alg, jwk=jwk)
    if not keys:
        raise ValueError("the JWKS holds no usable signing key")
    return keys
