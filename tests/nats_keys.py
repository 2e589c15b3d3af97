"""NKeys and NATS JWTs made in the test, for servers that authenticate users by key.

`nsc` is not available here, so the operator, account and user of a decentralised-auth server
(operator mode, memory resolver) are made with the `nkeys` library: each JWT is a header, its
claims and an ed25519 signature by the issuer's key, as nats-io/jwt v2 encodes them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import nkeys


@dataclass(frozen=True)
class Key:
    """An NKey: its seed (`S...`, secret) and public key (`U...`, `A...`, `O...`)."""

    seed: str
    public: str

    @classmethod
    def new(cls, prefix: int) -> Key:
        seed = nkeys.encode_seed(os.urandom(32), prefix)
        return cls(seed=seed.decode(), public=nkeys.from_seed(bytearray(seed)).public_key.decode())

    def sign(self, data: bytes) -> bytes:
        key_pair = nkeys.from_seed(bytearray(self.seed.encode()))
        try:
            return bytes(key_pair.sign(data))
        finally:
            key_pair.wipe()


def user_key() -> Key:
    return Key.new(nkeys.PREFIX_BYTE_USER)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(issuer: Key, subject: str, name: str, nats: dict[str, object]) -> str:
    claims: dict[str, object] = {
        "iat": int(time.time()),
        "iss": issuer.public,
        "name": name,
        "sub": subject,
        "nats": nats,
    }
    digest = hashlib.sha256(json.dumps(claims, sort_keys=True).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    header = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{header}.{body}.{_b64(issuer.sign(f'{header}.{body}'.encode()))}"


_UNLIMITED = {
    "subs": -1,
    "data": -1,
    "payload": -1,
    "imports": -1,
    "exports": -1,
    "wildcards": True,
    "conn": -1,
    "leaf": -1,
}


@dataclass(frozen=True)
class Operator:
    """An operator, a system account and one application account with JetStream."""

    operator: Key
    system: Key
    account: Key

    @classmethod
    def new(cls) -> Operator:
        return cls(
            operator=Key.new(nkeys.PREFIX_BYTE_OPERATOR),
            system=Key.new(nkeys.PREFIX_BYTE_ACCOUNT),
            account=Key.new(nkeys.PREFIX_BYTE_ACCOUNT),
        )

    def server_config(self) -> str:
        """nats-server config lines: operator mode with the accounts preloaded in memory."""
        operator_jwt = _jwt(
            self.operator, self.operator.public, "busway-test", {"type": "operator", "version": 2}
        )
        system_jwt = _jwt(
            self.operator,
            self.system.public,
            "SYS",
            {"limits": _UNLIMITED, "type": "account", "version": 2},
        )
        jetstream = {"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1}
        account_jwt = _jwt(
            self.operator,
            self.account.public,
            "app",
            {"limits": {**_UNLIMITED, **jetstream}, "type": "account", "version": 2},
        )
        return (
            f'operator: "{operator_jwt}"\n'
            f"system_account: {self.system.public}\n"
            "resolver: MEMORY\n"
            "resolver_preload: {\n"
            f'  {self.system.public}: "{system_jwt}"\n'
            f'  {self.account.public}: "{account_jwt}"\n'
            "}\n"
        )

    def write_creds(self, path: Path, user: Key) -> Path:
        """A `.creds` file for `user` of the application account, as `nsc` writes them."""
        user_jwt = _jwt(
            self.account,
            user.public,
            "busway",
            {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user"}
            | {"version": 2},
        )
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{user.seed}\n"
            "------END USER NKEY SEED------\n"
        )
        return path
