"""The `http` source over real HTTP on loopback: 202 only once stored, clear errors otherwise."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, eventually, stream_messages

pytestmark = pytest.mark.anyio


@pytest.fixture
async def bus(nats_server: NatsServer, unique: str, tmp_path: Path) -> AsyncIterator[Bus]:
    config = decode_test_config(
        config_toml(
            nats_server,
            publish_timeout="2s",
            streams=[stream_table(f"IN_{unique}", f"in{unique}.>")],
        )
        + f"""
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
    assert second.json()["id"] == "api:anon:order-42"
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
    assert ready.json()["checks"] == {
        "nats": True,
        "jetstream": True,
        "pub_acks": True,
        "source:api": True,
    }
    await http.post("/orders", json={"id": 1})
    metrics = (await http.get("/metrics")).text
    assert 'busway_messages_published_total{component="api",kind="source"} 1.0' in metrics
    assert 'busway_messages_received_total{component="api",kind="source"} 1.0' in metrics


# ---------------------------------------------------------------------------------------------
# Path templates, methods, NDJSON, bytes, CloudEvents, rate limits

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
async def rich(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    # A stream that takes two messages and refuses the rest: a JetStream failure on demand.
    await nc.jetstream().add_stream(
        name=f"CAP_{unique}",
        subjects=[f"cap{unique}.>"],
        max_msgs=2,
        discard=DiscardPolicy.NEW,
        duplicate_window=60,
    )
    config = decode_test_config(
        config_toml(
            nats_server,
            publish_timeout="2s",
            streams=[
                stream_table(f"IN_{unique}", f"in{unique}.>"),
                stream_table(f"CAP_{unique}", f"cap{unique}.>", create=False),
            ],
        )
        + f"""
[[sources]]
name = "regional"
type = "http"
path = "/regional/{{region}}/{{kind}}"
subject = "in{unique}.regional.{{region}}.{{kind}}"
methods = ["POST", "PUT"]

[[sources]]
name = "raw"
type = "http"
path = "/raw"
subject = "in{unique}.raw"
content = "bytes"

[[sources]]
name = "lines"
type = "http"
path = "/lines"
subject = "in{unique}.lines"

[[sources]]
name = "capped"
type = "http"
path = "/capped"
subject = "cap{unique}.x"

[[sources]]
name = "limited"
type = "http"
path = "/limited"
subject = "in{unique}.limited"
auth = {{ api_keys = ["{key_hash(KEY_A)}", "{key_hash(KEY_B)}"] }}
rate_limit = {{ rate = 0.01, burst = 3 }}
""",
        tmp_path,
    )
    async with (
        Bus(config) as running,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{running.http_port}") as client,
    ):
        client.bus = running  # type: ignore[attr-defined]
        yield client


def errors_of(client: httpx.AsyncClient, source: str) -> dict[str, int]:
    bus: Bus = client.bus  # type: ignore[attr-defined]
    return next(s.errors for s in bus.metrics.stats if s.name == source)


async def test_path_parameters_become_subject_tokens(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    assert (await rich.post("/regional/eu/new", json={"n": 1})).status_code == 202
    assert (await rich.put("/regional/us-east/update", json={"n": 2})).status_code == 202
    assert (await rich.get("/regional/eu/new")).status_code == 405
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [m.subject for m in stored] == [
        f"in{unique}.regional.eu.new",
        f"in{unique}.regional.us-east.update",
    ]


@pytest.mark.parametrize("region", ["e.u", "%2A", "%3E", "a%20b", "e%2Eu"])
async def test_a_path_parameter_that_is_not_one_safe_token_is_refused(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str, region: str
) -> None:
    response = await rich.post(f"/regional/{region}/new", json={"n": 1})
    assert response.status_code == 400
    assert response.json()["field"] == "path.region"
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 0


async def test_opaque_bytes_keep_their_content_type(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    body = b"\x89PNG\r\n\x1a\n\x00binary"
    response = await rich.post("/raw", content=body, headers={"content-type": "image/png"})
    assert response.status_code == 202
    [stored] = await stream_messages(nc, f"IN_{unique}")
    assert stored.data == body
    assert stored.headers and stored.headers["Content-Type"] == "image/png"


async def test_ndjson_lines_are_published_one_message_each_with_per_line_answers(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    body = b'{"n": 1}\n{"n": 2,\n\n{"n": 4}\n'
    headers = {"content-type": "application/x-ndjson", "Idempotency-Key": "batch-7"}
    response = await rich.post("/lines", content=body, headers=headers)
    assert response.status_code == 207
    answer = response.json()
    assert (answer["accepted"], answer["failed"]) == (2, 1)
    assert [(r["line"], r["status"]) for r in answer["results"]] == [(1, 202), (2, 400), (4, 202)]
    assert answer["results"][1]["field"] == "body.line[2]"
    assert [r.get("id") for r in answer["results"]] == [
        "lines:anon:batch-7:1",
        None,
        "lines:anon:batch-7:4",
    ]
    stored = await stream_messages(nc, f"IN_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [{"n": 1}, {"n": 4}]

    # The client retries the whole body with the same key: nothing is stored twice.
    again = await rich.post("/lines", content=body, headers=headers)
    assert again.status_code == 207
    assert [r.get("duplicate") for r in again.json()["results"]] == [True, None, True]
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 2


async def test_ndjson_with_every_line_bad_is_a_400(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    response = await rich.post(
        "/lines", content=b"nope\n{\n", headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 400
    assert [r["status"] for r in response.json()["results"]] == [400, 400]
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 0


async def test_ndjson_lines_jetstream_refuses_are_503_lines_in_a_207(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    body = b"".join(b'{"n": %d}\n' % n for n in range(4))
    response = await rich.post(
        "/capped", content=body, headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 207
    assert [r["status"] for r in response.json()["results"]] == [202, 202, 503, 503]
    stored = await stream_messages(nc, f"CAP_{unique}")
    assert [orjson.loads(m.data) for m in stored] == [{"n": 0}, {"n": 1}]
    # Nothing stored at all: 503, so the client knows a retry can work.
    response = await rich.post(
        "/capped", content=b'{"n": 9}\n', headers={"content-type": "application/x-ndjson"}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"


async def test_cloudevents_binary_mode_keeps_attributes_as_headers(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    headers = {
        "ce-specversion": "1.0",
        "ce-id": "evt-1",
        "ce-source": "/partners/acme",
        "ce-type": "com.acme.order.created",
        "ce-tenant": "acme",
        "content-type": "application/json",
    }
    first = await rich.post("/lines", content=b'{"n": 1}', headers=headers)
    second = await rich.post("/lines", content=b'{"n": 1}', headers=headers)
    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json()["duplicate"] is True  # the same source + id is the same event
    [stored] = await stream_messages(nc, f"IN_{unique}")
    assert stored.data == b'{"n": 1}'
    assert stored.headers is not None
    assert {k: v for k, v in stored.headers.items() if k.startswith("ce-")} == {
        "ce-specversion": "1.0",
        "ce-id": "evt-1",
        "ce-source": "/partners/acme",
        "ce-type": "com.acme.order.created",
        "ce-tenant": "acme",
    }
    bad = await rich.post("/lines", content=b"{}", headers={**headers, "ce-type": ""})
    assert bad.status_code == 400
    assert "type" in bad.json()["detail"]


async def test_cloudevents_structured_mode_splits_data_and_attributes(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    event = {
        "specversion": "1.0",
        "id": "evt-2",
        "source": "/crm",
        "type": "com.example.customer.updated",
        "datacontenttype": "application/json",
        "time": "2026-01-01T00:00:00Z",
        "priority": 3,
        "data": {"customer": "Ada"},
    }
    response = await rich.post(
        "/lines",
        content=orjson.dumps(event),
        headers={"content-type": "application/cloudevents+json"},
    )
    assert response.status_code == 202
    [stored] = await stream_messages(nc, f"IN_{unique}")
    assert orjson.loads(stored.data) == {"customer": "Ada"}
    assert stored.headers is not None
    assert stored.headers["Content-Type"] == "application/json"
    assert stored.headers["ce-id"] == "evt-2"
    assert stored.headers["ce-time"] == "2026-01-01T00:00:00Z"
    assert stored.headers["ce-priority"] == "3"


async def test_api_keys_and_the_rate_limit_per_key(
    rich: httpx.AsyncClient, nc: NatsClient, unique: str
) -> None:
    missing = await rich.post("/limited", json={"n": 0})
    wrong = await rich.post("/limited", json={"n": 0}, headers={"X-API-Key": "guess"})
    assert (missing.status_code, wrong.status_code) == (401, 401)
    assert "ApiKey" in missing.headers["www-authenticate"]
    answers = [
        (await rich.post("/limited", json={"n": n}, headers={"X-API-Key": KEY_A})).status_code
        for n in range(5)
    ]
    assert answers == [202, 202, 202, 429, 429]
    limited = await rich.post("/limited", json={"n": 9}, headers={"X-API-Key": KEY_A})
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    # Another client has its own bucket.
    other = await rich.post("/limited", json={"n": 5}, headers={"X-API-Key": KEY_B})
    assert other.status_code == 202
    assert (await nc.jetstream().stream_info(f"IN_{unique}")).state.messages == 4
    assert errors_of(rich, "limited") == {
        "unauthenticated": 1,
        "bad_api_key": 1,
        "rate_limited": 3,
    }


# ---------------------------------------------------------------------------------------------
# Integers beyond 64 bits


async def test_integers_beyond_64_bits_are_refused_and_those_within_arrive_exactly(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        config_toml(nats_server, streams=[stream_table(f"IN_{unique}", f"in{unique}.>")])
        + f"""
[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"

[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
to = ["in{unique}.out"]
transform = "{{amount: amount, items: items}}"

[[sinks]]
name = "out{unique}"
type = "file"
from = "in{unique}.out"
path = "out.jsonl"
""",
        tmp_path,
    )
    edges = b'{"amount": 18446744073709551615, "items": [{"id": -9223372036854775808}]}'
    async with (
        Bus(config) as bus,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http,
    ):
        json_type = {"content-type": "application/json"}
        within = await http.post("/orders", content=edges, headers=json_type)
        beyond = await http.post(
            "/orders",
            content=b'{"amount": 1, "items": [{"id": 1}, {"id": 2}, {"id": 3}, '
            b'{"id": 18446744073709551616}], "note": "12345678901234567890123"}',
            headers=json_type,
        )
        lines = await http.post(
            "/orders",
            content=b'{"amount": 2}\n{"amount": -9223372036854775809}\n',
            headers={"content-type": "application/x-ndjson"},
        )
        event = await http.post(
            "/orders",
            content=b'{"specversion": "1.0", "id": "e1", "source": "/s", "type": "t", '
            b'"data": {"amount": 123456789012345678901234567890}}',
            headers={"content-type": "application/cloudevents+json"},
        )

        async def delivered() -> bool:
            out = tmp_path / "out.jsonl"
            return out.exists() and len(out.read_bytes().splitlines()) == 2

        await eventually(delivered)
        errors = next(s.errors for s in bus.metrics.stats if s.name == "api")
    assert within.status_code == 202
    assert beyond.status_code == 400
    problem = beyond.json()
    assert problem["type"] == "urn:busway:problem:integer-out-of-range"
    assert problem["field"] == "body/items/3/id"
    assert problem["detail"].startswith(
        "the integer 18446744073709551616 at body/items/3/id does not fit 64 bits"
    )
    assert lines.status_code == 207
    refused_line = lines.json()["results"][1]
    assert (refused_line["status"], refused_line["field"]) == (400, "body.line[2]/amount")
    assert event.status_code == 400
    assert event.json()["field"] == "body/data/amount"
    assert errors == {"integer_out_of_range": 3}
    written = (tmp_path / "out.jsonl").read_bytes().splitlines()
    assert written == [
        b'{"amount":18446744073709551615,"items":[{"id":-9223372036854775808}]}',
        b'{"amount":2,"items":null}',
    ]
