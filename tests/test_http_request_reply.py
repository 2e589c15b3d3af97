"""Request-reply over HTTP: a synchronous API answered by a route's `reply` stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, stream_messages

pytestmark = pytest.mark.anyio


def config_text(server: NatsServer, unique: str, *, with_route: bool) -> str:
    route = f"""
[[routes]]
name = "quote{unique}"
from = "rq{unique}.quotes"
stages = [
  {{ filter = "qty > `0`" }},
  {{ set_headers = {{ "Busway-Http-Status" = "'201'" }} }},
  {{ reply = "{{sku: sku, total: qty}}" }},
]
"""
    return (
        config_toml(server, streams=[stream_table(f"RQ_{unique}", f"rq{unique}.>")])
        + f"""
[[sources]]
name = "api{unique}"
type = "http"
path = "/quotes"
subject = "rq{unique}.quotes"
reply_timeout = "{"10s" if with_route else "300ms"}"
{route if with_route else ""}
"""
    )


async def test_the_route_answers_the_http_request(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server, unique, with_route=True), tmp_path)
    async with (
        Bus(config) as bus,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as client,
    ):
        answers = [
            await client.post("/quotes", json={"sku": f"s{i}", "qty": i + 1}) for i in range(5)
        ]
        ndjson = await client.post(
            "/quotes", content=b'{"a":1}\n', headers={"Content-Type": "application/x-ndjson"}
        )
    assert [(a.status_code, a.json()) for a in answers] == [
        (201, {"sku": f"s{i}", "total": i + 1}) for i in range(5)
    ]
    assert ndjson.status_code == 415
    stored = await stream_messages(nc, f"RQ_{unique}")
    assert [orjson.loads(m.data)["sku"] for m in stored] == [f"s{i}" for i in range(5)]


async def test_no_reply_in_time_is_a_504_and_the_request_is_kept(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server, unique, with_route=False), tmp_path)
    async with Bus(config) as bus:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as client:
            answer = await client.post(
                "/quotes", json={"sku": "x", "qty": 1}, headers={"Idempotency-Key": "k1"}
            )
        errors = bus.metrics.stats[0].errors
    assert answer.status_code == 504
    assert answer.json()["detail"].startswith(f"no reply to the request api{unique}:anon:k1 within")
    assert errors == {"reply_timeout": 1}


class Gate:
    """Holds the route's answer until the test opens it; counts the requests it saw."""

    def __init__(self) -> None:
        self.open = anyio.Event()
        self.seen: list[dict[str, Any]] = []


GATES: dict[str, Gate] = {}


async def held_until_opened(body: dict[str, Any]) -> dict[str, Any]:
    """A slow step of the route: waits until the test opens the gate named in the body."""
    gate = GATES[body["gate"]]
    gate.seen.append(body)
    await gate.open.wait()
    return body


async def test_a_retry_after_a_504_gets_the_recorded_answer_from_any_daemon(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    gate = GATES[unique] = Gate()
    text = (
        config_toml(nats_server, streams=[stream_table(f"RQ_{unique}", f"rq{unique}.>")])
        + f"""
[[sources]]
name = "api"
type = "http"
path = "/quotes"
subject = "rq{unique}.quotes"
reply_timeout = "500ms"

[[routes]]
name = "slow{unique}"
from = "rq{unique}.quotes"
stages = [
  {{ python = "tests.test_http_request_reply:held_until_opened" }},
  {{ set_headers = {{ "Busway-Http-Status" = "'201'" }} }},
  {{ reply = "{{sku: sku, total: qty}}" }},
]
"""
    )
    key = {"Idempotency-Key": "quote-1"}
    body = {"gate": unique, "sku": "s1", "qty": 3}
    async with (
        Bus(decode_test_config(text, tmp_path)) as first_bus,
        Bus(decode_test_config(text, tmp_path)) as second_bus,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{first_bus.http_port}") as first,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{second_bus.http_port}") as second,
    ):
        timed_out = await first.post("/quotes", json=body, headers=key)
        while_processing = await second.post("/quotes", json=body, headers=key)
        other_body = await second.post("/quotes", json={**body, "qty": 4}, headers=key)
        gate.open.set()

        async def answered() -> httpx.Response:
            while True:
                response = await second.post("/quotes", json=body, headers=key)
                if response.status_code != 409:
                    return response
                await anyio.sleep(0.05)

        with anyio.fail_after(20):
            replayed = await answered()
    assert timed_out.status_code == 504
    assert while_processing.status_code == 409
    assert while_processing.headers["retry-after"] == "1"
    assert while_processing.json()["type"] == "urn:busway:problem:request-in-progress"
    assert other_body.status_code == 422
    assert (replayed.status_code, replayed.json()) == (201, {"sku": "s1", "total": 3})
    assert replayed.headers["idempotent-replayed"] == "true"
    assert len(gate.seen) == 1  # processed once, answered twice
    assert len(await stream_messages(nc, f"RQ_{unique}")) == 1
