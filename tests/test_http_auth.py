"""JWT bearer tokens on the `http` source, checked against real JWKS (a file and a URL)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from nats.aio.client import Client as NatsClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.http_support import serving
from tests.support import (
    NatsServer,
    decode_test_config,
    eventually,
    free_port,
    stream_messages,
)

pytestmark = pytest.mark.anyio

ISSUER = "https://login.example/"
AUDIENCE = "orders-api"


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Keys:
    """The issuer's keys: `a` (RSA), `e` (EC P-256), and `b` (RSA, published later)."""

    a: rsa.RSAPrivateKey = field(default_factory=rsa_key)
    b: rsa.RSAPrivateKey = field(default_factory=rsa_key)
    e: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    def jwks(self, *, with_b: bool = False) -> bytes:
        keys = [
            {**RSAAlgorithm.to_jwk(self.a.public_key(), as_dict=True), "kid": "a", "use": "sig"},
            {**ECAlgorithm.to_jwk(self.e.public_key(), as_dict=True), "kid": "e"},
        ]
        if with_b:
            keys.append({**RSAAlgorithm.to_jwk(self.b.public_key(), as_dict=True), "kid": "b"})
        return orjson.dumps({"keys": keys})


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys()


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], payload: dict[str, Any]) -> str:
    return f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"


@dataclass
class JwksServer:
    """Serves the issuer's JWKS and counts how often it is fetched."""

    document: bytes
    fetches: int = 0

    async def endpoint(self, _: Request) -> Response:
        self.fetches += 1
        return Response(self.document, media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/jwks.json", self.endpoint)])


@dataclass
class Setup:
    http: httpx.AsyncClient
    jwks: JwksServer
    bus: Bus


@pytest.fixture
async def setup(
    nats_server: NatsServer, unique: str, tmp_path: Path, keys: Keys
) -> AsyncIterator[Setup]:
    (tmp_path / "jwks.json").write_bytes(keys.jwks())
    jwks = JwksServer(keys.jwks())
    async with serving(jwks.app()) as issuer:
        common = f'issuer = "{ISSUER}", audience = "{AUDIENCE}"'
        config = decode_test_config(
            config_toml(
                nats_server,
                streams=[stream_table(f"IN_{unique}", f"in{unique}.>")],
                # This module fails authentication on purpose, many times from one address: the
                # address's failure limit (tests/test_edge_guard.py) would answer 429 to most of it.
                http_options="auth_failure_limit = { rate = 1000, burst = 1000 }",
            )
            + f"""
[[sources]]
name = "file"
type = "http"
path = "/file"
subject = "in{unique}.file"
auth = {{ jwt = {{ jwks_file = "jwks.json", {common}, algorithms = ["RS256", "ES256", "HS256"] }} }}
rate_limit = {{ rate = 0.01, burst = 30 }}

[[sources]]
name = "url"
type = "http"
path = "/url"
subject = "in{unique}.url"
auth = {{ jwt = {{ jwks_url = "{issuer}/jwks.json", {common}, min_refresh = "3s" }} }}

[[sources]]
name = "down"
type = "http"
path = "/down"
subject = "in{unique}.down"
auth = {{ jwt = {{ jwks_url = "http://127.0.0.1:{free_port()}/jwks", {common} }} }}
""",
            tmp_path,
        )
        async with (
            Bus(config) as bus,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http,
        ):
            yield Setup(http, jwks, bus)


async def post(setup: Setup, path: str, token: str) -> httpx.Response:
    return await setup.http.post(path, json={"n": 1}, headers={"Authorization": f"Bearer {token}"})


UNAUTHORIZED = {
    "type": "urn:busway:problem:unauthorized",
    "title": "Unauthorized",
    "status": 401,
    "detail": "the request carries no valid credentials: send a valid Authorization: Bearer token",
}


def refused_because(setup: Setup, response: httpx.Response, reason: str) -> bool:
    """The 401 says nothing of which check failed; the source's metrics and log do."""
    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert response.headers["www-authenticate"] == 'Bearer realm="busway"'
    stats = next(s for s in setup.bus.metrics.stats if s.name == "file")
    return stats.errors.get(reason, 0) >= 1


async def test_valid_tokens_are_admitted(setup: Setup, keys: Keys) -> None:
    rs = jwt.encode(claims(), keys.a, algorithm="RS256", headers={"kid": "a"})
    es = jwt.encode(claims(), keys.e, algorithm="ES256", headers={"kid": "e"})
    assert (await post(setup, "/file", rs)).status_code == 202
    assert (await post(setup, "/file", es)).status_code == 202
    assert (await post(setup, "/url", rs)).status_code == 202


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"exp": -60}, "token_expired"),
        ({"aud": "someone-else"}, "token_audience"),
        ({"iss": "https://evil.example/"}, "token_issuer"),
        ({"exp": None}, "token_claim_missing"),
        ({"nbf": 3600}, "token_not_yet_valid"),
    ],
    ids=["expired", "wrong-audience", "wrong-issuer", "no-exp", "not-yet-valid"],
)
async def test_tokens_with_bad_claims_are_refused(
    setup: Setup, keys: Keys, overrides: dict[str, Any], expected: str
) -> None:
    now = int(time.time())  # times are offsets from now, computed when the test runs
    relative = {
        k: now + v if k in ("exp", "nbf") and v is not None else v for k, v in overrides.items()
    }
    token = jwt.encode(claims(**relative), keys.a, algorithm="RS256", headers={"kid": "a"})
    response = await post(setup, "/file", token)
    assert refused_because(setup, response, expected)


async def test_alg_none_is_refused(setup: Setup) -> None:
    token = unsigned({"alg": "none", "typ": "JWT", "kid": "a"}, claims()) + "."
    response = await post(setup, "/file", token)
    assert refused_because(setup, response, "token_algorithm")


async def test_a_bad_signature_is_refused(setup: Setup) -> None:
    impostor = rsa_key()  # signs as kid "a" with a key that is not a's
    token = jwt.encode(claims(), impostor, algorithm="RS256", headers={"kid": "a"})
    response = await post(setup, "/file", token)
    assert refused_because(setup, response, "token_signature")


async def test_hs256_signed_with_the_rsa_public_key_is_refused(setup: Setup, keys: Keys) -> None:
    # The HS/RS confusion attack: the public key, which anyone has, used as an HMAC secret.
    public_pem = keys.a.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = unsigned({"alg": "HS256", "typ": "JWT", "kid": "a"}, claims())
    mac = hmac.new(public_pem, signing_input.encode(), hashlib.sha256).digest()
    response = await post(setup, "/file", f"{signing_input}.{b64(mac)}")
    assert refused_because(setup, response, "token_algorithm")


async def test_missing_or_malformed_credentials_are_refused(setup: Setup) -> None:
    missing = await setup.http.post("/file", json={"n": 1})
    assert refused_because(setup, missing, "unauthenticated")
    assert refused_because(setup, await post(setup, "/file", "not.a.jwt"), "token_malformed")
    basic = await setup.http.post("/file", json={}, headers={"Authorization": "Basic YTpi"})
    assert refused_because(setup, basic, "unauthenticated")


async def test_a_rotated_key_is_fetched_once_and_unknown_kids_cannot_flood_the_issuer(
    setup: Setup, keys: Keys
) -> None:
    assert setup.jwks.fetches == 1  # at start-up
    setup.jwks.document = keys.jwks(with_b=True)  # the issuer rotates to key b
    rotated = jwt.encode(claims(), keys.b, algorithm="RS256", headers={"kid": "b"})

    async def admitted() -> bool:
        # Refused while the last fetch is younger than min_refresh (3 s), then admitted.
        return (await post(setup, "/url", rotated)).status_code == 202

    await eventually(admitted)
    assert setup.jwks.fetches == 2
    fetched = setup.jwks.fetches
    forged = [
        jwt.encode(claims(), keys.b, algorithm="RS256", headers={"kid": f"made-up-{n}"})
        for n in range(10)
    ]
    statuses: list[int] = []

    async def send(token: str) -> None:
        statuses.append((await post(setup, "/url", token)).status_code)

    async with anyio.create_task_group() as tg:
        for token in forged:
            tg.start_soon(send, token)
    assert statuses == [401] * 10
    assert setup.jwks.fetches == fetched  # inside min_refresh: no fetch at all


async def test_an_unreachable_jwks_answers_503_not_401(setup: Setup, keys: Keys) -> None:
    token = jwt.encode(claims(), keys.a, algorithm="RS256", headers={"kid": "a"})
    response = await post(setup, "/down", token)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    stats = next(s for s in setup.bus.metrics.stats if s.name == "down")
    assert stats.errors == {"jwks_unavailable": 1}


async def test_the_rate_limit_is_per_token_subject(
    setup: Setup, keys: Keys, nc: NatsClient, unique: str
) -> None:
    alice = jwt.encode(claims(sub="alice"), keys.a, algorithm="RS256", headers={"kid": "a"})
    bob = jwt.encode(claims(sub="bob"), keys.a, algorithm="RS256", headers={"kid": "a"})
    statuses = [(await post(setup, "/file", alice)).status_code for _ in range(31)]
    assert statuses == [202] * 30 + [429]
    assert (await post(setup, "/file", bob)).status_code == 202
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 31
    stats = next(s for s in setup.bus.metrics.stats if s.name == "file")
    assert stats.errors == {"rate_limited": 1}


async def test_refusals_tell_an_unauthenticated_caller_nothing_internal(
    setup: Setup, keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    token = jwt.encode(claims(), keys.a, algorithm="RS256", headers={"kid": "a"})
    expired = jwt.encode(
        claims(exp=int(time.time()) - 60), keys.a, algorithm="RS256", headers={"kid": "a"}
    )
    forged = jwt.encode(claims(), rsa_key(), algorithm="RS256", headers={"kid": "a"})
    unknown = jwt.encode(claims(), keys.a, algorithm="RS256", headers={"kid": "nobody"})
    with caplog.at_level("INFO", logger="busway.source"):
        down = await post(setup, "/down", token)
        refusals = [await post(setup, "/file", t) for t in ("not.a.jwt", expired, forged, unknown)]
    assert down.status_code == 503
    assert down.json() == {
        "type": "urn:busway:problem:unavailable",
        "title": "Service Unavailable",
        "status": 503,
        "detail": "credentials cannot be checked now; retry after the Retry-After delay",
    }
    assert "127.0.0.1" not in down.text and "http" not in down.text  # no JWKS URL
    # Malformed, expired, forged and unknown-key tokens all read the same.
    assert {r.text for r in refusals} == {refusals[0].text}
    assert refusals[0].json() == UNAUTHORIZED
    # ... and the log says which was which (the JWKS URL included, for the operator).
    logged = caplog.text
    assert "/jwks" in logged and "malformed bearer token" in logged
    assert "the token has expired" in logged and "signature does not verify" in logged
    assert "unknown key id 'nobody'" in logged


async def test_an_idempotency_key_is_scoped_to_the_token_subject(
    setup: Setup, keys: Keys, nc: NatsClient, unique: str
) -> None:
    alice = jwt.encode(claims(sub="alice"), keys.a, algorithm="RS256", headers={"kid": "a"})
    bob = jwt.encode(claims(sub="bob"), keys.a, algorithm="RS256", headers={"kid": "a"})
    answers = [
        await setup.http.post(
            "/file",
            json={"from": name},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": "order-1"},
        )
        for name, token in [("alice", alice), ("bob", bob), ("alice", alice)]
    ]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [a.json()["duplicate"] for a in answers] == [False, False, True]
    ids = [a.json()["id"] for a in answers]
    assert all(re.fullmatch(r"file:jwt\.[0-9a-f]{32}:order-1", i) for i in ids)
    assert ids[0] == ids[2] != ids[1]
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [{"from": "alice"}, {"from": "bob"}]
