"""Who is calling: API keys hashed at rest, or JWT bearer tokens checked against a JWKS.

    [sources.auth]
    api_keys = ["sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"]
    api_key_header = "X-API-Key"

or, to name each key's principal (its messages carry `Busway-Principal: acme`):

    [[sources.auth.api_keys]]
    name = "acme"
    hash = "sha256:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"

    [sources.auth.jwt]
    jwks_url = "https://login.example/.well-known/jwks.json"   # or jwks_file = "jwks.json"
    issuer = "https://login.example/"
    audience = "orders-api"
    algorithms = ["RS256", "ES256"]

An API key is compared as its SHA-256 with `hmac.compare_digest` against every configured hash
(the config never holds a usable key, and the time taken does not say which hash came close).
A JWT must name an allowed `alg` that fits its key's type: `none` is never allowed, and an RSA
or EC key is never used as an HMAC secret (the HS/RS confusion attack), whatever the token
says. `exp` is required; `exp`, `nbf` and `iat` get `leeway` seconds of clock skew; `iss` and
`aud` must match. PyJWT (with `cryptography`) does the cryptography: it is the most used JOSE
library for Python, maintained, and small; the checks that need context (alg against key type,
kid lookup and refresh) are ours, in `jwks.py` and here.

A refusal's `AuthFailure` carries what was wrong (`detail`, for the log) and a short `reason`
(a metric label); the caller is told neither, only that its credentials were not valid: an
unauthenticated caller learns nothing from an expired token answering differently from a
forged one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
import msgspec
from jwt.exceptions import (
    DecodeError,
    ExpiredSignatureError,
    ImmatureSignatureError,
    InvalidAudienceError,
    InvalidIssuedAtError,
    InvalidIssuerError,
    InvalidSignatureError,
    InvalidTokenError,
    MissingRequiredClaimError,
    PyJWTError,
)

from busway import BuildContext, Duration
from busway.adapters.http.client import fetch_bytes
from busway.adapters.http.jwks import JwksCache, SigningKey

__all__ = ["ApiKey", "AuthConfig", "AuthFailure", "Authenticator", "Identity", "JwtConfig"]

_KEY_HASH = re.compile(r"^sha256:([0-9a-f]{64})$")
_KEY_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
# The algorithms a key type may verify; a token's `alg` must be one of its key's.
_ALGORITHMS_BY_KEY_TYPE = {
    "RSA": frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"}),
    "EC": frozenset({"ES256", "ES384", "ES512"}),
    "OKP": frozenset({"EdDSA"}),
    "oct": frozenset({"HS256", "HS384", "HS512"}),
}
_KNOWN_ALGORITHMS = frozenset().union(*_ALGORITHMS_BY_KEY_TYPE.values())
_MALFORMED = "malformed bearer token: expected a JWS compact token (header.payload.signature)"
# Most specific first: InvalidSignatureError is a DecodeError. (reason label, log text)
_TOKEN_PROBLEMS: tuple[tuple[type[PyJWTError], str, str], ...] = (
    (ExpiredSignatureError, "token_expired", "the token has expired"),
    (
        ImmatureSignatureError,
        "token_not_yet_valid",
        "the token is not yet valid (nbf or iat in the future)",
    ),
    (InvalidAudienceError, "token_audience", "the token's audience does not match this endpoint"),
    (InvalidIssuerError, "token_issuer", "the token's issuer is not accepted here"),
    (InvalidIssuedAtError, "token_iat", "the token's iat is not a valid time"),
    (
        InvalidSignatureError,
        "token_signature",
        "the signature does not verify with the key the token names",
    ),
    (DecodeError, "token_malformed", _MALFORMED),
)


class JwtConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Bearer tokens: where the keys are, and what a token must say."""

    issuer: str
    """The token's `iss` must equal this."""
    audience: str | list[str]
    """The token's `aud` must contain this (or one of these)."""
    jwks_file: str | None = None
    """A JWKS file with the signing keys, relative to the config file (exactly one of
    `jwks_file` and `jwks_url`)."""
    jwks_url: str | None = None
    """An http(s) URL serving the JWKS with the signing keys."""
    algorithms: list[str] = msgspec.field(default_factory=lambda: ["RS256", "ES256"])
    """Allowed signature algorithms; `none` never is, and a token's `alg` must fit its key's
    type."""
    leeway: Duration = Duration(10.0)
    """Clock skew allowed when checking `exp` (required), `nbf` and `iat`."""
    refresh: Duration = Duration(600.0)
    """How often the keys are reloaded; a failed reload keeps the known keys."""
    min_refresh: Duration = Duration(30.0)
    """Least time between two reloads, also those an unknown `kid` triggers (so a flood of
    forged tokens cannot hammer the key server)."""
    fetch_timeout: Duration = Duration(5.0)
    """Longest wait for `jwks_url` to answer."""

    def __post_init__(self) -> None:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwt.jwks_file and jwt.jwks_url")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwt.jwks_url must be an http(s) URL")
        if not self.algorithms:
            raise ValueError("jwt.algorithms must allow at least one algorithm")
        for algorithm in self.algorithms:
            if algorithm not in _KNOWN_ALGORITHMS:
                raise ValueError(
                    f"jwt.algorithms: {algorithm!r} is not allowed; choose from "
                    f"{', '.join(sorted(_KNOWN_ALGORITHMS))} ('none' never is)"
                )
        if not self.audience:
            raise ValueError("jwt.audience must name at least one audience")


class ApiKey(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A named API key: its name is the principal stamped on the messages it sends."""

    name: str
    """The partner's name, stamped as `Busway-Principal` (letters, digits, `.`, `_`, `-`)."""
    hash: str
    """The key's hash, `"sha256:<64 lowercase hex>"`."""


class AuthConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-source authentication: API keys, JWT, or both (either one admits a request)."""

    api_keys: list[str | ApiKey] = msgspec.field(default_factory=list)
    """Accepted keys, each its hash `"sha256:<64 lowercase hex>"` (`printf %s "$KEY" |
    sha256sum`), never the key itself, compared in constant time; or `{ name, hash }` to
    name the principal its messages carry (an unnamed key is `key:<first 12 hex>`)."""
    api_key_header: str = "X-API-Key"
    """Request header carrying the API key."""
    jwt: JwtConfig | None = None
    """Accept bearer tokens (`Authorization: Bearer ...`) signed by these keys."""

    def __post_init__(self) -> None:
        if not self.api_keys and self.jwt is None:
            raise ValueError("auth needs api_keys, jwt, or both")
        names: set[str] = set()
        for i, key in enumerate(self.api_keys):
            hashed = key if isinstance(key, str) else key.hash
            if not _KEY_HASH.match(hashed):
                raise ValueError(
                    f"api_keys[{i}] must be 'sha256:<64 lowercase hex>' (the key's hash, e.g. "
                    '`printf %s "$KEY" | sha256sum`), never the key itself'
                )
            if isinstance(key, ApiKey):
                if not _KEY_NAME.match(key.name):
                    raise ValueError(
                        f"api_keys[{i}].name must be 1-64 letters, digits, '.', '_' or '-'"
                    )
                if key.name in names:
                    raise ValueError(f"api_keys[{i}].name {key.name!r} is used twice")
                names.add(key.name)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller.

    `client` keys its rate limit (`key:<id>` or `sub:<subject>`). `principal` scopes its
    `Idempotency-Key`s: `key.<hash>` (the API key's SHA-256, as configured) or `jwt.<hash>`
    (of the token's `iss` and `sub`), 128 bits of SHA-256 in hex, so it can neither hold a
    separator nor be chosen to equal another client's.

    `name` and `issuer` are what messages carry (`Busway-Principal`, `Busway-Principal-
    Issuer`): the API key's name, or the token's `sub` and `iss`.
    """

    client: str
    principal: str
    name: str | None = None
    issuer: str | None = None
    claims: Mapping[str, Any] | None = None


class AuthFailure(Exception):
    """The request is not admitted: 401 (credentials) or 503 (keys cannot be loaded).

    `detail` says what was wrong and `reason` names it for metrics; neither is for the caller.
    """

    def __init__(self, detail: str, *, status: int = 401, reason: str = "unauthorized") -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.reason = reason


class Authenticator:
    """Checks a request's credentials against one source's `AuthConfig`."""

    def __init__(self, config: AuthConfig, context: BuildContext) -> None:
        self.config = config
        self.header = config.api_key_header
        self._hashes: list[bytes] = []
        self._names: list[str] = []
        for key in config.api_keys:
            hashed = key if isinstance(key, str) else key.hash
            self._hashes.append(bytes.fromhex(hashed[len("sha256:") :]))
            self._names.append(
                key.name if isinstance(key, ApiKey) else f"key:{hashed[len('sha256:') :][:12]}"
            )
        self._jwt = config.jwt
        self.jwks: JwksCache | None = None
        if config.jwt is not None:
            jwt_config = config.jwt
            if jwt_config.jwks_file is not None:
                self.jwks = JwksCache.from_file(
                    context.resolve_path(jwt_config.jwks_file),
                    refresh=jwt_config.refresh,
                    min_refresh=jwt_config.min_refresh,
                )
            else:
                url = jwt_config.jwks_url
                assert url is not None

                async def load() -> bytes:
                    return await fetch_bytes(url, timeout=jwt_config.fetch_timeout)

                self.jwks = JwksCache(
                    load,
                    where=url,
                    refresh=jwt_config.refresh,
                    min_refresh=jwt_config.min_refresh,
                )
            self._audience = (
                [jwt_config.audience]
                if isinstance(jwt_config.audience, str)
                else list(jwt_config.audience)
            )
            self._algorithms = frozenset(jwt_config.algorithms)

    @property
    def challenge(self) -> str:
        """The `WWW-Authenticate` value of a 401."""
        schemes = []
        if self._jwt is not None:
            schemes.append('Bearer realm="busway"')
        if self._hashes:
            schemes.append(f'ApiKey realm="busway", header="{self.header}"')
        return ", ".join(schemes)

    async def start(self) -> None:
        """Load the JWKS once at start-up; a failure is logged and retried on use."""
        if self.jwks is not None:
            await self.jwks.reload()

    async def authenticate(self, headers: Mapping[str, str]) -> Identity:
        """The caller's identity, or AuthFailure saying what is wrong."""
        presented = headers.get(self.header)
        if presented is not None and self._hashes:
            return self._check_api_key(presented)
        authorization = headers.get("authorization")
        if authorization is not None and self._jwt is not None:
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return await self._check_jwt(token.strip())
        raise AuthFailure("no credentials sent", reason="unauthenticated")

    @property
    def expected(self) -> str:
        """What a caller must send, as a 401 tells it."""
        return " or ".join(
            ([f"a valid {self.header} header"] if self._hashes else [])
            + (["a valid Authorization: Bearer token"] if self._jwt is not None else [])
        )

    def _check_api_key(self, presented: str) -> Identity:
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found: str | None = None
        for known, name in zip(self._hashes, self._names, strict=True):
            # no early exit: every hash is compared
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise AuthFailure("unknown API key", reason="bad_api_key")
        return Identity(
            client=f"key:{digest.hex()[:12]}", principal=f"key.{digest.hex()[:32]}", name=found
        )

    async def _check_jwt(self, token: str) -> Identity:
        assert self._jwt is not None
        assert self.jwks is not None
        try:
            header = jwt.get_unverified_header(token)
        except InvalidTokenError:
            raise AuthFailure(_MALFORMED, reason="token_malformed") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise AuthFailure(
                f"token algorithm {algorithm!r} is not allowed here "
                f"(allowed: {', '.join(sorted(self._algorithms))})",
                reason="token_algorithm",
            )
        kid = header.get("kid")
        key = await self.jwks.find(kid if isinstance(kid, str) else None)
        if key is None:
            if not self.jwks.loaded:
                # The reason names the JWKS URL: for the log, never for the caller.
                raise AuthFailure(
                    f"cannot check tokens: {self.jwks.last_error or 'the JWKS is not loaded'}",
                    status=503,
                    reason="jwks_unavailable",
                )
            shown = kid[:64] if isinstance(kid, str) else kid
            raise AuthFailure(
                f"token signed with unknown key id {shown!r}", reason="token_unknown_key"
            )
        _check_algorithm_fits(algorithm, key)
        try:
            claims = jwt.decode(
                token,
                key.jwk.key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._jwt.issuer,
                leeway=float(self._jwt.leeway),
                options={"require": ["exp", "iss", "aud"]},
            )
        except PyJWTError as exc:
            reason, text = _token_problem(exc)
            raise AuthFailure(f"invalid bearer token: {text}", reason=reason) from None
        subject = claims.get("sub")
        scope = hashlib.sha256(msgspec.json.encode([claims["iss"], subject])).hexdigest()
        return Identity(
            client=f"sub:{subject}" if subject else f"iss:{claims['iss']}",
            principal=f"jwt.{scope[:32]}",
            name=str(subject) if subject else None,
            issuer=str(claims["iss"]),
            claims=claims,
        )


def _token_problem(exc: PyJWTError) -> tuple[str, str]:
    """What is wrong with a token, as a metric reason and in our words for the log."""
    if isinstance(exc, MissingRequiredClaimError):
        return "token_claim_missing", f'the required claim "{exc.claim}" is missing'
    for kind, reason, text in _TOKEN_PROBLEMS:
        if isinstance(exc, kind):
            return reason, text
    return "token_malformed", _MALFORMED


def _check_algorithm_fits(algorithm: str, key: SigningKey) -> None:
    """Refuse `alg` values the key was not made for: HS256 over an RSA key, RS256 over oct."""
    fits = _ALGORITHMS_BY_KEY_TYPE.get(key.kty, frozenset())
    if algorithm not in fits or (key.alg is not None and key.alg != algorithm):
        raise AuthFailure(
            f"token algorithm {algorithm!r} does not fit key {key.kid!r} "
            f"({key.kty}{', pinned to ' + key.alg if key.alg else ''})",
            reason="token_algorithm",
        )
