"""Request-reply over HTTP: a synchronous API answered by a route's `reply` stage."""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
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
    return f"""
[nats]
servers = ["{server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "RQ_{unique}"
subjects = ["rq{unique}.>"]

[[sources]]
name = "api{unique}"
type = "http"
path = "/quotes"
subject = "rq{unique}.quotes"
reply_timeout = "{"10s" if with_route else "300ms"}"
{route if with_route else ""}
"""


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
    assert answer.json()["detail"].startswith(f"the request api{unique}:k1 was stored")
    assert errors == {"reply_timeout": 1}
