"""`encrypt`/`decrypt` and `sign`/`verify` through a real nats-server, real keys, real crypto.

Round trips with key rotation; tampered ciphertexts, unknown key ids, malformed envelopes and
bad signatures dead-lettered at once with the right reason and no key or plaintext in it; and
key config errors reported in one line naming the key.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from busway import Bus
from busway.routers.crypto import Keyring, canonical
from busway.routers.pipeline import RoutingError
from busway.routers.route import compile_route
from busway.routers.stages import StageConfig
from tests.support import (
    NatsServer,
    decode_test_config,
    run_cli,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


def config_text(server: NatsServer, unique: str, routes: str) -> str:
    return f"""
[nats]
servers = ["{server.url}"]
publish_timeout = "2s"

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]

{routes}
"""


def write_aes_key(path: Path, form: str = "hex") -> bytes:
    key = os.urandom(32)
    if form == "hex":
        path.write_text(key.hex() + "\n")
    elif form == "base64":
        path.write_text(base64.b64encode(key).decode())
    else:
        path.write_bytes(key)
    return key


async def publish_all(nc: NatsClient, subject: str, bodies: list[Any]) -> None:
    js = nc.jetstream()
    for body in bodies:
        await js.publish(subject, orjson.dumps(body))


async def on_subject(nc: NatsClient, unique: str, subject: str) -> list[Msg]:
    return [m for m in await stream_messages(nc, f"OUT_{unique}") if m.subject == subject]


async def dead_letters(nc: NatsClient, route: str) -> list[Msg]:
    return [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.{route}"
    ]


async def test_encrypted_fields_round_trip_and_old_keys_still_decrypt_after_rotation(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    old_key = write_aes_key(tmp_path / "2024.key", "hex")
    write_aes_key(tmp_path / "2025.key", "raw")
    os.environ[f"BODY_KEY_{unique}"] = base64.urlsafe_b64encode(os.urandom(32)).decode()
    before = f"""
[[routes]]
name = "seal{unique}"
from = "in{unique}.orders"
to = ["out{unique}.sealed"]
stages = [{{ encrypt = {{ fields = ["card.number", "cvv"], keys = [{{ id = "2024", file = "2024.key" }}] }} }}]
"""  # noqa: E501 - TOML inline tables cannot span lines
    first = [
        {"id": i, "card": {"number": f"4111111111111{i:03d}"}, "cvv": 100 + i} for i in range(3)
    ]
    async with Bus(decode_test_config(config_text(nats_server, unique, before), tmp_path)):
        await publish_all(nc, f"in{unique}.orders", first)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-seal{unique}")

    # Rotation: the new key goes first (it encrypts), the old one stays listed (it decrypts).
    keys = '[{ id = "2025", file = "2025.key" }, { id = "2024", file = "2024.key" }]'
    after = f"""
[[routes]]
name = "seal{unique}"
from = "in{unique}.orders"
to = ["out{unique}.sealed"]
stages = [{{ encrypt = {{ fields = ["card.number", "cvv"], keys = {keys} }} }}]

[[routes]]
name = "open{unique}"
from = "out{unique}.sealed"
to = ["out{unique}.opened"]
start = "all"
stages = [{{ decrypt = {{ fields = ["card.number", "cvv"], keys = {keys} }} }}]

[[routes]]
name = "body{unique}"
from = "in{unique}.whole"
to = ["out{unique}.wholesealed"]
stages = [{{ encrypt = {{ keys = [{{ id = "b1", env = "BODY_KEY_{unique}" }}] }} }}]

[[routes]]
name = "unbody{unique}"
from = "out{unique}.wholesealed"
to = ["out{unique}.whole"]
stages = [{{ decrypt = {{ keys = [{{ id = "b1", env = "BODY_KEY_{unique}" }}] }} }}]
"""
    second = [
        {"id": i, "card": {"number": f"5555555555554{i:03d}"}, "cvv": 200 + i} for i in range(3, 5)
    ]
    async with Bus(decode_test_config(config_text(nats_server, unique, after), tmp_path)):
        await publish_all(nc, f"in{unique}.orders", second)
        await publish_all(nc, f"in{unique}.whole", [{"secret": "plans", "n": [1, 2.5, None]}])
        await wait_settled(nc, f"IN_{unique}", f"busway-route-seal{unique}")
        await wait_settled(nc, f"OUT_{unique}", f"busway-route-open{unique}")
        await wait_settled(nc, f"IN_{unique}", f"busway-route-body{unique}")
        await wait_settled(nc, f"OUT_{unique}", f"busway-route-unbody{unique}")

    sealed = [orjson.loads(m.data) for m in await on_subject(nc, unique, f"out{unique}.sealed")]
    assert [s["card"]["number"]["kid"] for s in sealed] == ["2024"] * 3 + ["2025"] * 2
    assert [s["cvv"]["kid"] for s in sealed] == ["2024"] * 3 + ["2025"] * 2
    assert all(s["card"]["number"]["alg"] == "A256GCM" for s in sealed)
    raw = b"".join(m.data for m in await on_subject(nc, unique, f"out{unique}.sealed"))
    assert b"4111111111111" not in raw and b"5555555555554" not in raw
    # The old key, read independently, opens the first batch: the envelope is the documented one.
    assert Keyring({"2024": old_key}).decrypt(sealed[0]["card"]["number"], "card.number") == (
        "4111111111111000"
    )
    opened = [orjson.loads(m.data) for m in await on_subject(nc, unique, f"out{unique}.opened")]
    assert sorted(opened, key=lambda o: o["id"]) == first + second
    [envelope] = await on_subject(nc, unique, f"out{unique}.wholesealed")
    assert set(orjson.loads(envelope.data)) == {"v", "alg", "kid", "iv", "ct"}
    assert b"plans" not in envelope.data
    whole = [orjson.loads(m.data) for m in await on_subject(nc, unique, f"out{unique}.whole")]
    assert whole == [{"secret": "plans", "n": [1, 2.5, None]}]
    assert await dead_letters(nc, f"open{unique}") == []


async def test_tampered_unknown_key_and_malformed_envelopes_are_dead_lettered(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    key = write_aes_key(tmp_path / "k1.key", "base64")
    other = os.urandom(32)
    keyring = Keyring({"k1": key})
    tampered = keyring.encrypt("4111111111111111", "pan")
    sealed = bytearray(base64.urlsafe_b64decode(tampered["ct"] + "=="))
    sealed[0] ^= 0x01
    tampered["ct"] = base64.urlsafe_b64encode(bytes(sealed)).rstrip(b"=").decode()
    bodies = [
        {"id": "good", "pan": keyring.encrypt("4111111111111111", "pan")},
        {"id": "tampered", "pan": tampered},
        {"id": "unknown", "pan": Keyring({"k9": other}).encrypt("x", "pan")},
        {"id": "impostor", "pan": Keyring({"k1": other}).encrypt("x", "pan")},
        {"id": "moved", "pan": keyring.encrypt("x", "elsewhere")},
        {"id": "malformed", "pan": "4111111111111111"},
        {"id": "absent"},
    ]
    routes = f"""
[[routes]]
name = "open{unique}"
from = "in{unique}.sealed"
to = ["out{unique}.opened"]
stages = [{{ decrypt = {{ fields = ["pan"], keys = [{{ id = "k1", file = "k1.key" }}] }} }}]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    async with Bus(config) as bus:
        await publish_all(nc, f"in{unique}.sealed", bodies)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-open{unique}")
        assert bus.metrics.stats[0].retried == 0  # permanent: never retried

    opened = [orjson.loads(m.data) for m in await on_subject(nc, unique, f"out{unique}.opened")]
    assert opened == [{"id": "good", "pan": "4111111111111111"}, {"id": "absent"}]
    dead = {
        orjson.loads(m.data)["id"]: m.headers or {} for m in await dead_letters(nc, f"open{unique}")
    }
    assert {name: h["Busway-Crypto-Failure"] for name, h in dead.items()} == {
        "tampered": "tampered",
        "unknown": "unknown-key",
        "impostor": "tampered",
        "moved": "tampered",
        "malformed": "malformed",
    }
    assert {h["Busway-Error-Reason"] for h in dead.values()} == {"decrypt"}
    assert {h["Busway-Stage"] for h in dead.values()} == {"stages[0].decrypt"}
    assert dead["unknown"]["Busway-Error"] == (
        "stages[0].decrypt: field 'pan': key id 'k9' is not among the stage's keys (k1)"
    )
    for headers in dead.values():
        error = headers["Busway-Error"]
        assert key.hex() not in error and base64.b64encode(key).decode() not in error
        assert "4111" not in error


def ed25519_pem(path: Path) -> Path:
    private = Ed25519PrivateKey.generate()
    path.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = path.with_suffix(".pub.pem")
    public.write_bytes(
        private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return public


async def test_signatures_verify_and_forgeries_are_dead_lettered(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    ed25519_pem(tmp_path / "s1.pem")
    (tmp_path / "shared.secret").write_text(os.urandom(32).hex())
    hmac_keys = '[{ id = "h1", file = "shared.secret" }]'
    routes = f"""
[[routes]]
name = "sign{unique}"
from = "in{unique}.orders"
to = ["out{unique}.signed"]
stages = [
  {{ sign = {{ algorithm = "ed25519", keys = [{{ id = "s1", file = "s1.pem" }}] }} }},
  {{ sign = {{ algorithm = "hmac-sha256", field = "sig", keys = {hmac_keys} }} }},
]

[[routes]]
name = "check{unique}"
from = "out{unique}.signed"
to = ["out{unique}.verified"]
stages = [
  {{ verify = {{ algorithm = "hmac-sha256", field = "sig", keys = {hmac_keys} }} }},
  {{ verify = {{ algorithm = "ed25519", keys = [{{ id = "s1", file = "s1.pub.pem" }}] }} }},
]
"""
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await publish_all(
            nc, f"in{unique}.orders", [{"id": 1, "total": 10, "items": {"b": 1, "a": 2}}]
        )
        await wait_settled(nc, f"IN_{unique}", f"busway-route-sign{unique}")
        signed = (await on_subject(nc, unique, f"out{unique}.signed"))[0]
        headers = {"Busway-Signature": (signed.headers or {})["Busway-Signature"]}
        body = orjson.loads(signed.data)
        # A forgery: the total changed, both signatures copied from the genuine message.
        await js.publish(
            f"out{unique}.signed", orjson.dumps({**body, "id": 2, "total": 1000}), headers=headers
        )
        await wait_settled(nc, f"OUT_{unique}", f"busway-route-check{unique}")

    verified = [orjson.loads(m.data) for m in await on_subject(nc, unique, f"out{unique}.verified")]
    assert verified == [{"id": 1, "total": 10, "items": {"b": 1, "a": 2}}]  # `sig` checked, gone
    assert body["sig"].startswith("h1:")
    assert headers["Busway-Signature"].startswith("s1:")
    dead = {
        orjson.loads(m.data)["id"]: m.headers or {}
        for m in await dead_letters(nc, f"check{unique}")
    }
    assert dead[2]["Busway-Error-Reason"] == "signature"
    assert dead[2]["Busway-Crypto-Failure"] == "bad-signature"
    assert dead[2]["Busway-Error"] == (
        "stages[0].verify: field 'sig': the hmac-sha256 signature under key 'h1' does not match "
        "the body"
    )


async def test_missing_ed25519_signature_header_is_dead_lettered(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    ed25519_pem(tmp_path / "s1.pem")
    routes = f"""
[[routes]]
name = "check{unique}"
from = "in{unique}.signed"
to = ["out{unique}.verified"]
stages = [{{ verify = {{ algorithm = "ed25519", header = "X-Sig", keys = [{{ id = "s1", file = "s1.pub.pem" }}] }} }}]
"""  # noqa: E501
    config = decode_test_config(config_text(nats_server, unique, routes), tmp_path)
    async with Bus(config):
        await publish_all(nc, f"in{unique}.signed", [{"id": 1}])
        await nc.jetstream().publish(
            f"in{unique}.signed", orjson.dumps({"id": 2}), headers={"X-Sig": "s7:AAAA"}
        )
        await wait_settled(nc, f"IN_{unique}", f"busway-route-check{unique}")

    assert await on_subject(nc, unique, f"out{unique}.verified") == []
    dead = {
        orjson.loads(m.data)["id"]: m.headers or {}
        for m in await dead_letters(nc, f"check{unique}")
    }
    assert dead[1]["Busway-Crypto-Failure"] == "missing"
    assert dead[1]["Busway-Error"] == "stages[0].verify: header X-Sig: no signature"
    assert dead[2]["Busway-Crypto-Failure"] == "unknown-key"


def test_canonical_form_sorts_keys_at_every_depth_and_leaves_out_the_signature_field() -> None:
    assert canonical(
        {"b": {"z": 1, "a": [{"y": 2, "x": "é"}]}, "a": 1, "sig": "s"}, without="sig"
    ) == ('{"a":1,"b":{"a":[{"x":"é","y":2}],"z":1}}'.encode())


def test_sign_then_verify_in_one_route_and_a_later_change_breaks_it(tmp_path: Path) -> None:
    """Signing covers the body as it leaves the stage: a later change makes `verify` fail."""
    (tmp_path / "secret").write_text("s" * 40)
    keys = [{"id": "h", "file": "secret"}]
    sign = {"sign": {"algorithm": "hmac-sha256", "keys": keys}}
    verify = {"verify": {"algorithm": "hmac-sha256", "keys": keys}}

    def route(*stages: dict[str, Any]) -> Any:
        return compile_route(
            name="r",
            to=["out"],
            stages=msgspec.convert(list(stages), list[StageConfig]),
            resolve_path=lambda p: tmp_path / p,
        )

    [output] = route(sign, verify).process(b'{"a": 1}')
    assert output.headers is not None and output.headers["Busway-Signature"].startswith("h:")
    with pytest.raises(RoutingError, match="does not match the body") as caught:
        route(sign, {"set": {"a": "`2`"}}, verify).process(b'{"a": 1}')
    assert caught.value.kind == "signature"
    assert not caught.value.transient


@pytest.mark.parametrize(
    ("stage", "key_file", "expected"),
    [
        (
            'encrypt = { keys = [{ id = "k1", file = "KEYFILE" }] }',
            b"00112233445566778899aabbccddeeff\n",  # an AES-128 key
            "$.routes[0].stages[0].encrypt.keys[0].file: key 'k1': file {path} holds 16 bytes "
            "(read as hex); an AES-256 key is 32 bytes",
        ),
        (
            'decrypt = { keys = [{ id = "k1", file = "KEYFILE" }] }',
            None,
            "$.routes[0].stages[0].decrypt.keys[0].file: key 'k1': cannot read file {path}: "
            "No such file or directory",
        ),
        (
            'verify = { algorithm = "ed25519", keys = [{ id = "s1", file = "KEYFILE" }] }',
            b"-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n",
            "$.routes[0].stages[0].verify.keys[0].file: key 's1': file {path} is not a PEM "
            "public or private key",
        ),
        (
            'sign = { algorithm = "hmac-sha256", keys = [{ id = "h1", file = "KEYFILE" }] }',
            b"short",
            "$.routes[0].stages[0].sign.keys[0].file: key 'h1': file {path} holds 5 bytes; an "
            "HMAC-SHA256 secret needs at least 32",
        ),
        (
            'sign = { algorithm = "rsa-pss", keys = [{ id = "s1", file = "KEYFILE" }] }',
            b"unused",
            "$.routes[0].stages[0].sign: unknown signature algorithm 'rsa-pss': use 'ed25519' "
            "or 'hmac-sha256'",
        ),
    ],
    ids=["wrong-length", "missing-file", "bad-pem", "short-secret", "unknown-algorithm"],
)
def test_key_config_errors_are_one_line_naming_the_key(
    tmp_path: Path, stage: str, key_file: bytes | None, expected: str
) -> None:
    path = tmp_path / "keys" / "the.key"
    path.parent.mkdir()
    if key_file is not None:
        path.write_bytes(key_file)
    config = tmp_path / "busway.toml"
    config.write_text(
        f"""
[[streams]]
name = "IN"
subjects = ["in.>"]

[[routes]]
name = "r"
from = "in.a"
to = ["in.b"]
stages = [{{ {stage.replace("KEYFILE", "keys/the.key")} }}]
"""
    )
    result = run_cli("check", str(config))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected.format(path=path) in lines[0]
    assert "Traceback" not in result.stderr
    assert "00112233445566778899aabbccddeeff" not in result.stderr  # never the key itself
