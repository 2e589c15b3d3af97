"""`Idempotency-Key` on the `http` source: scoped per client, bound to one request, shared by
every daemon on the NATS, and 503s that say whether a message may be stored."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.nats_proxy import PubAckHolder
from tests.support import NatsServer, decode_test_config, stream_messages

pytestmark = pytest.mark.anyio

KEY_A, KEY_B = "key-of-client-a", "key-of-client-b"


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def config_text(url: str, unique: str, *, auth: bool = False, publish_timeout: str = "5s") -> str:
    auth_line = f'auth = {{ api_keys = ["sha256:{sha(KEY_A)}", "sha256:{sha(KEY_B)}"] }}'
    return (
        config_toml(
            url,
            publish_timeout=publish_timeout,
            streams=[stream_table(f"IN_{unique}", f"in{unique}.>", duplicate_window="90s")],
        )
        + f"""
[[sources]]
name = "api"
type = "http"
path = "/orders/{{region}}"
subject = "in{unique}.orders.{{region}}"
{auth_line if auth else ""}
"""
    )


@asynccontextmanager
async def daemons(count: int, text: str, tmp_path: Path) -> AsyncIterator[list[httpx.AsyncClient]]:
    """`count` buses on one config and one NATS (daemons behind a load balancer)."""
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(count):
            bus = await stack.enter_async_context(Bus(decode_test_config(text, tmp_path)))
            clients.append(
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}")
                )
            )
        yield clients


async def test_two_clients_with_the_same_key_store_two_messages_and_each_retry_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    async with daemons(1, config_text(nats_server.url, unique, auth=True), tmp_path) as [http]:
        answers = [
            await http.post(
                "/orders/eu",
                json={"from": name},
                headers={"X-API-Key": api_key, "Idempotency-Key": "order-1"},
            )
            for name, api_key in [("a", KEY_A), ("b", KEY_B), ("a", KEY_A)]
        ]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert [a.json()["duplicate"] for a in answers] == [False, False, True]
    ids = [a.json()["id"] for a in answers]
    assert ids[0] == f"api:key.{sha(KEY_A)[:32]}:order-1" == ids[2]
    assert ids[1] == f"api:key.{sha(KEY_B)[:32]}:order-1"
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [{"from": "a"}, {"from": "b"}]


async def test_a_key_cannot_be_made_to_spell_another_messages_id(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    # NDJSON line ids are `<key>:<line>`; a key holding ":" must not land on one of them.
    async with daemons(1, config_text(nats_server.url, unique), tmp_path) as [http]:
        lines = await http.post(
            "/orders/eu",
            content=b'{"line": 1}\n',
            headers={"Content-Type": "application/x-ndjson", "Idempotency-Key": "batch"},
        )
        single = await http.post(
            "/orders/eu", json={"single": True}, headers={"Idempotency-Key": "batch:1"}
        )
    assert lines.json()["results"][0]["id"] == "api:anon:batch:1"
    assert (single.status_code, single.json()["duplicate"]) == (202, False)
    assert single.json()["id"] == "api:anon:batch%3A1"
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [{"line": 1}, {"single": True}]


async def test_a_key_reused_for_another_request_is_refused_with_422_by_any_daemon(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    key = {"Idempotency-Key": "order-7"}
    async with daemons(2, config_text(nats_server.url, unique), tmp_path) as [first, second]:
        stored = await first.post("/orders/eu", json={"total": 10}, headers=key)
        other_body = await second.post("/orders/eu", json={"total": 99}, headers=key)
        other_path = await second.post("/orders/us", json={"total": 10}, headers=key)
        retry = await second.post("/orders/eu", json={"total": 10}, headers=key)
        other_lines = await second.post(
            "/orders/eu",
            content=b'{"total": 10}\n',
            headers={**key, "Content-Type": "application/x-ndjson"},
        )
    assert stored.status_code == 202
    for refused in (other_body, other_path, other_lines):
        assert refused.status_code == 422
        problem = refused.json()
        assert problem["type"] == "urn:busway:problem:idempotency-key-reused"
        assert problem["field"] == "header.Idempotency-Key"
        assert "'order-7' was already used for a different request" in problem["detail"]
    assert (retry.status_code, retry.json()["duplicate"]) == (202, True)
    messages = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in messages] == [{"total": 10}]
    # The key is remembered exactly as long as the stream remembers the message id.
    bucket = await nc.jetstream().stream_info(f"KV_busway_dedup_IN_{unique}_api")
    assert bucket.config.max_age == 90.0


async def test_a_503_with_nothing_stored_names_nothing_internal_and_frees_the_key(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    js = nc.jetstream()
    key = {"Idempotency-Key": "order-8"}
    async with daemons(1, config_text(nats_server.url, unique), tmp_path) as [http]:
        kept = (await js.stream_info(f"IN_{unique}")).config
        await js.delete_stream(f"IN_{unique}")
        refused = await http.post("/orders/eu", json={"total": 1}, headers=key)
        await js.add_stream(kept)
        corrected = await http.post("/orders/eu", json={"total": 2}, headers=key)
    assert refused.status_code == 503
    problem = refused.json()
    assert problem["type"] == "urn:busway:problem:unavailable"
    assert problem["detail"] == "the message was not stored; retry later"
    assert unique not in refused.text  # neither the stream nor the subject
    assert corrected.status_code == 202  # nothing was stored: the key was not used up
    assert [orjson.loads(m.data) for m in await stream_messages(nc, f"IN_{unique}")] == [
        {"total": 2}
    ]


async def test_a_lost_puback_is_a_503_saying_the_message_may_be_stored(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    holder = PubAckHolder(nats_server.port, f"in{unique}.orders.eu")
    key = {"Idempotency-Key": "order-9"}
    async with holder.running():
        text = config_text(holder.url, unique, publish_timeout="1s")
        async with daemons(1, text, tmp_path) as [http]:
            lost = await http.post("/orders/eu", json={"total": 1}, headers=key)
            assert holder.holding.is_set()
            holder.release()
            other = await http.post("/orders/eu", json={"total": 2}, headers=key)
            retry = await http.post("/orders/eu", json={"total": 1}, headers=key)
    assert lost.status_code == 503
    assert lost.headers["retry-after"] == "1"
    problem = lost.json()
    assert problem["type"] == "urn:busway:problem:not-confirmed"
    assert problem["detail"] == (
        "the message was sent but its storage was not confirmed: it MAY have been accepted; "
        "retry with the same Idempotency-Key: if it was stored, the retry is deduplicated"
    )
    assert other.status_code == 422  # it may be stored: the key stays bound to its body
    assert (retry.status_code, retry.json()["duplicate"]) == (202, True)
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [{"total": 1}]
