"""The `http` source over real HTTP on loopback: 202 only once stored, clear errors otherwise."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.support import NatsServer, decode_test_config, stream_messages

pytestmark = pytest.mark.anyio


@pytest.fixture
async def bus(nats_server: NatsServer, unique: str, tmp_path: Path) -> AsyncIterator[Bus]:
    config = decode_test_config(
        f"""
[nats]
servers = ["{nats_server.url}"]
publish_timeout = "2s"

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"
max_body = 1000
""",
        tmp_path,
    )
    async with Bus(config) as running:
        yield running


@pytest.fixture
async def http(bus: Bus) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as client:
        yield client


async def test_accepted_message_is_stored_before_the_202(
    http: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    body = {"id": 1, "total": 250, "customer": {"name": "Ada"}}
    response = await http.post("/orders", json=body)
    assert response.status_code == 202
    answer = response.json()
    assert answer["stream"] == f"IN_{unique}" and answer["seq"] == 1
    assert answer["duplicate"] is False
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [body]
    assert stored[0].headers and stored[0].headers["Content-Type"] == "application/json"


async def test_idempotency_key_stores_a_retried_request_once(
    http: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await http.post("/orders", json={"id": 42}, headers=headers)
    second = await http.post("/orders", json={"id": 42}, headers=headers)
    assert (first.status_code, second.status_code) == (202, 202)
    assert first.json()["duplicate"] is False
    assert second.json()["duplicate"] is True
    assert second.json()["id"] == "api:order-42"
    assert len(await stream_messages(nc, f"IN_{unique}")) == 1


async def test_oversized_body_is_refused_with_413_and_nothing_stored(
    bus: Bus, http: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    response = await http.post("/orders", json={"pad": "x" * 2000})
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert "max_body of 1000 bytes" in response.json()["detail"]
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 0
    assert bus.metrics.stats[0].errors == {"too_large": 1}


async def test_non_json_content_type_is_refused_with_415(http: httpx.AsyncClient) -> None:
    response = await http.post("/orders", content=b"id=1", headers={"content-type": "text/plain"})
    assert response.status_code == 415
    assert response.json()["type"] == "urn:busway:problem:unsupported-media-type"


async def test_invalid_json_is_refused_with_400_saying_where(http: httpx.AsyncClient) -> None:
    response = await http.post(
        "/orders", content=b'{"id": 1,', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    assert "not JSON" in response.json()["detail"]


async def test_unavailable_stream_answers_503_with_retry_after(
    bus: Bus, http: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    await nc.jetstream().delete_stream(f"IN_{unique}")
    response = await http.post("/orders", json={"id": 1})
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "not stored" in response.json()["detail"]
    assert bus.metrics.stats[0].errors == {"publish": 1}


async def test_operational_endpoints(bus: Bus, http: httpx.AsyncClient) -> None:
    assert (await http.get("/healthz")).json() == {"status": "ok"}
    ready = await http.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"nats": True, "source:api": True}
    await http.post("/orders", json={"id": 1})
    metrics = (await http.get("/metrics")).text
    assert 'busway_messages_published_total{component="api",kind="source"} 1.0' in metrics
    assert 'busway_messages_received_total{component="api",kind="source"} 1.0' in metrics
