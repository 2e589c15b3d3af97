"""Headers in, identity recorded: an HTTP source keeps allow-listed headers and stamps the
principal, and routes match on both, end to end through real JetStream."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import httpx
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm
from nats.aio.client import Client as NatsClient

from busway import Bus, ConfigError
from tests.support import (
    NatsServer,
    decode_test_config,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio

ACME_KEY = "acme-key-0123456789abcdef"
LEGACY_KEY = "legacy-key-0123456789abcdef"
ISSUER = "https://login.example/"


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def config_text(server: NatsServer, unique: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]

[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"
headers = ["X-Tier", "traceparent"]

[sources.auth]
api_keys = ["{key_hash(LEGACY_KEY)}", {{ name = "acme", hash = "{key_hash(ACME_KEY)}" }}]
jwt = {{ jwks_file = "jwks.json", issuer = "{ISSUER}", audience = "orders" }}

[[routes]]
name = "gold"
from = "in{unique}.orders"
when = "header('X-Tier') == 'gold'"
to = ["out{unique}.gold"]

[[routes]]
name = "from-acme"
from = "in{unique}.orders"
when = "header('Busway-Principal') == 'acme' && header('Busway-Principal-Issuer') == `null`"
to = ["out{unique}.acme"]

[[routes]]
name = "from-alice"
from = "in{unique}.orders"
when = "header('Busway-Principal') == 'alice' && header('Busway-Principal-Issuer') == '{ISSUER}'"
to = ["out{unique}.alice"]
"""


async def test_routes_match_on_passed_headers_and_on_the_principal_never_a_forged_one(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k"}
    (tmp_path / "jwks.json").write_bytes(orjson.dumps({"keys": [jwk]}))
    now = int(time.time())
    alice = jwt.encode(
        {"iss": ISSUER, "aud": "orders", "sub": "alice", "exp": now + 300},
        key,
        algorithm="RS256",
        headers={"kid": "k"},
    )
    config = decode_test_config(config_text(nats_server, unique), tmp_path)
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with Bus(config) as bus:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            sent = [
                # acme, gold, traced; it tries to pass itself off as alice and to set an id.
                await http.post(
                    "/orders",
                    json={"n": 1},
                    headers={
                        "X-API-Key": ACME_KEY,
                        "x-tier": "gold",
                        "traceparent": trace,
                        "X-Other": "dropped",
                        "Busway-Principal": "alice",
                        "Busway-Principal-Issuer": ISSUER,
                        "Nats-Msg-Id": "forged",
                    },
                ),
                # alice by JWT, claiming to be acme.
                await http.post(
                    "/orders",
                    json={"n": 2},
                    headers={
                        "Authorization": f"Bearer {alice}",
                        "X-Tier": "basic",
                        "Busway-Principal": "acme",
                    },
                ),
                # an unnamed key: its principal is its hash's prefix.
                await http.post("/orders", json={"n": 3}, headers={"X-API-Key": LEGACY_KEY}),
                # NDJSON lines carry the same headers.
                await http.post(
                    "/orders",
                    content=b'{"n": 4}\n{"n": 5}\n',
                    headers={
                        "X-API-Key": ACME_KEY,
                        "X-Tier": "gold",
                        "Content-Type": "application/x-ndjson",
                    },
                ),
            ]
            assert [s.status_code for s in sent] == [202, 202, 202, 202]
        for route in ("gold", "from-acme", "from-alice"):
            await wait_settled(nc, f"IN_{unique}", f"busway-route-{route}")
    stored = {
        orjson.loads(m.data)["n"]: m.headers or {}
        for m in await stream_messages(nc, f"IN_{unique}")
    }
    assert {k: v for k, v in stored[1].items() if k != "Nats-Msg-Id"} == {
        "Content-Type": "application/json",
        "X-Tier": "gold",
        "traceparent": trace,
        "Busway-Principal": "acme",
    }
    assert stored[1]["Nats-Msg-Id"] != "forged"
    assert stored[2]["Busway-Principal"] == "alice"
    assert stored[2]["Busway-Principal-Issuer"] == ISSUER
    legacy = hashlib.sha256(LEGACY_KEY.encode()).hexdigest()[:12]
    assert stored[3]["Busway-Principal"] == f"key:{legacy}"
    assert "X-Tier" not in stored[3]
    assert [stored[n]["X-Tier"] for n in (4, 5)] == ["gold", "gold"]
    assert [stored[n]["Busway-Principal"] for n in (4, 5)] == ["acme", "acme"]

    routed: dict[str, list[int]] = {}
    for message in await stream_messages(nc, f"OUT_{unique}"):
        routed.setdefault(message.subject.rsplit(".", 1)[1], []).append(
            orjson.loads(message.data)["n"]
        )
    assert {k: sorted(v) for k, v in routed.items()} == {
        "gold": [1, 4, 5],
        "acme": [1, 4, 5],
        "alice": [2],
    }


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("Busway-Principal", "is reserved"),
        ("nats-msg-id", "is reserved"),
        ("Authorization", "carries credentials"),
        ("Cookie", "carries credentials"),
        ("X-API-Key", "carries credentials"),
        ("Connection", "describes the connection"),
        ("Transfer-Encoding", "describes the connection"),
        ("X Tier", "is not a valid header name"),
    ],
)
def test_headers_that_may_never_pass_are_a_config_error(
    nats_server: NatsServer, unique: str, tmp_path: Path, name: str, why: str
) -> None:
    (tmp_path / "jwks.json").write_text('{"keys": []}')
    text = config_text(nats_server, unique).replace(
        'headers = ["X-Tier", "traceparent"]', f'headers = ["X-Tier", "{name}"]'
    )
    with pytest.raises(ConfigError, match=why):
        decode_test_config(text, tmp_path)
