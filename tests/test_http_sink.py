"""The `http` sink against a real receiver on loopback: retries, dead letters, signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from standardwebhooks import Webhook
from starlette.responses import Response

from busway import Bus, ConfigError
from busway.adapters.http.classify import parse_retry_after
from busway.adapters.http.signing import WebhookSigner
from tests.configs import config_toml, stream_table
from tests.http_support import Receiver, Seen, serving
from tests.support import (
    NatsServer,
    decode_test_config,
    eventually,
    free_port,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()


def sink_config(server: NatsServer, unique: str, url: str, extra: str = "") -> str:
    return (
        config_toml(server, streams=[stream_table(f"OUT_{unique}", f"out{unique}.>")])
        + f"""
[[sinks]]
name = "hook{unique}"
type = "http"
from = "out{unique}.>"
url = "{url}"
retry = {{ max_attempts = 50, backoff = "50ms", max_backoff = "2s" }}
{extra}
"""
    )


async def publish(nc: NatsClient, subject: str, count: int, prefix: str = "m") -> list[str]:
    """Publish `count` JSON messages with ids `<prefix>-<n>`; returns the ids.

    The stream is created here if the bus has not yet, so that a test can publish everything
    before the sink starts (its first batches then hold all of them).
    """
    js = nc.jetstream()
    await ensure_stream(nc, subject.split(".")[0].removeprefix("out"))
    ids = []
    for n in range(count):
        message_id = f"{prefix}-{n}"
        await js.publish(subject, orjson.dumps({"n": n}), headers={"Nats-Msg-Id": message_id})
        ids.append(message_id)
    return ids


async def ensure_stream(nc: NatsClient, unique: str) -> None:
    """The test's stream, before the bus creates it, so tests can publish first."""
    await nc.jetstream().add_stream(name=f"OUT_{unique}", subjects=[f"out{unique}.>"])


async def dead_letters(nc: NatsClient, unique: str) -> list[dict[str, str]]:
    return [
        {**(m.headers or {}), "data": m.data.decode()}
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.hook{unique}"
    ]


async def test_a_flaky_receiver_gets_every_message_exactly_once(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    def respond(seen: Seen) -> Response:
        # Down for its first 7 requests (5xx and a 408), then healthy.
        if seen.number <= 6:
            return Response(b"maintenance", status_code=503)
        if seen.number == 7:
            return Response(b"slow", status_code=408)
        return Response(b"", status_code=204)

    receiver = Receiver(respond)
    async with serving(receiver.app()) as base:
        config = decode_test_config(
            sink_config(nats_server, unique, f"{base}/hooks/orders"), tmp_path
        )
        ids = await publish(nc, f"out{unique}.orders", 20)
        async with Bus(config) as bus:
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
            stats = bus.metrics.stats[0]
            assert stats.published == 20
            assert stats.dead_lettered == 0
            assert stats.retried >= 7
            assert bus.readiness()[f"sink:hook{unique}"] is True
    assert receiver.handled == dict.fromkeys(ids, 1)  # every message, none twice
    assert all(seen.path == "/hooks/orders" for seen in receiver.seen)
    assert await dead_letters(nc, unique) == []


async def test_a_4xx_is_dead_lettered_with_its_status_and_not_retried(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    def respond(seen: Seen) -> Response:
        if orjson.loads(seen.body)["n"] == 1:
            return Response(b'{"error": "customer unknown"}' + b"x" * 2000, status_code=422)
        return Response(b"", status_code=200)

    receiver = Receiver(respond)
    async with serving(receiver.app()) as base:
        config = decode_test_config(sink_config(nats_server, unique, f"{base}/h"), tmp_path)
        ids = await publish(nc, f"out{unique}.x", 3)
        async with Bus(config) as bus:
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
            assert bus.metrics.stats[0].dead_lettered == 1
    assert receiver.handled == {ids[0]: 1, ids[2]: 1}
    rejected = [s for s in receiver.seen if s.headers["idempotency-key"] == ids[1]]
    assert len(rejected) == 1  # a permanent failure is not retried
    [dead] = await dead_letters(nc, unique)
    assert dead["data"] == '{"n":1}'
    assert dead["Busway-Error-Reason"] == "http_422"
    assert dead["Busway-Http-Status"] == "422"
    error = dead["Busway-Error"]
    assert error.startswith("HTTP 422 Unprocessable ")
    assert '{"error": "customer unknown"}' in error
    assert len(error) < 700  # an excerpt of the answer, not all of it


async def test_retry_lists_reclassify_statuses(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """A partner answering 409 while another system catches up: retry it (`transient`); a
    503 known to mean "never" for this partner: dead-letter it at once (`permanent`)."""
    conflicts = 0

    def respond(seen: Seen) -> Response:
        nonlocal conflicts
        n = orjson.loads(seen.body)["n"]
        if n == 0 and conflicts < 2:
            conflicts += 1
            return Response(b"not yet", status_code=409)
        if n == 1:
            return Response(b"gone for good", status_code=503)
        return Response(b"", status_code=200)

    retry = (
        'retry = { max_attempts = 50, backoff = "50ms", max_backoff = "1s", '
        'transient = ["http_409"], permanent = ["http_503"] }'
    )
    receiver = Receiver(respond)
    async with serving(receiver.app()) as base:
        text = sink_config(nats_server, unique, f"{base}/h").replace(
            'retry = { max_attempts = 50, backoff = "50ms", max_backoff = "2s" }', retry
        )
        config = decode_test_config(text, tmp_path)
        ids = await publish(nc, f"out{unique}.x", 3)
        async with Bus(config) as bus:
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
            errors = dict(bus.metrics.stats[0].errors)
    assert receiver.handled == {ids[0]: 1, ids[2]: 1}
    assert conflicts == 2
    assert errors == {"http_409": 2, "http_503": 1}
    [dead] = await dead_letters(nc, unique)
    assert dead["data"] == '{"n":1}' and dead["Busway-Error-Reason"] == "http_503"
    assert dead["Busway-Http-Status"] == "503"


async def test_retry_after_is_honoured(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    def respond(seen: Seen) -> Response:
        if seen.number == 1:
            return Response(b"slow down", status_code=429, headers={"Retry-After": "1"})
        return Response(b"", status_code=200)

    receiver = Receiver(respond)
    async with serving(receiver.app()) as base:
        # Without Retry-After the retry would come after 50 ms.
        config = decode_test_config(sink_config(nats_server, unique, f"{base}/h"), tmp_path)
        await publish(nc, f"out{unique}.x", 1)
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    first, second = receiver.seen
    # JetStream redelivers a nak'ed message no earlier than its delay: a lower bound only.
    assert second.at - first.at >= 0.95
    assert second.headers["idempotency-key"] == first.headers["idempotency-key"]


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now) == 20.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0.0  # in the past
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


async def test_requests_are_signed_and_carry_the_message_id(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        config = decode_test_config(
            sink_config(nats_server, unique, f"{base}/h", f'signing_secret = "{SECRET}"'),
            tmp_path,
        )
        ids = await publish(nc, f"out{unique}.x", 3)
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    verifier = Webhook(SECRET)  # the standardwebhooks reference implementation
    for seen in receiver.seen:
        assert verifier.verify(seen.body, seen.headers) == orjson.loads(seen.body)
        assert seen.headers["webhook-id"] == seen.headers["idempotency-key"]
        tampered = {**seen.headers, "webhook-id": "other"}
        with pytest.raises(Exception, match="No matching signature"):
            verifier.verify(seen.body, tampered)
    assert sorted(s.headers["webhook-id"] for s in receiver.seen) == sorted(ids)


async def test_url_and_headers_are_templated_from_the_message(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        extra = """method = "PUT"
headers = { X-Region = "{subject[1]}", X-Trace = "{header.X-Trace}", X-Fixed = "v1" }"""
        url = f"{base}/customers/{{body.customer.id}}/orders/{{body.n}}?region={{subject[-2]}}"
        config = decode_test_config(sink_config(nats_server, unique, url, extra), tmp_path)
        js = nc.jetstream()
        await ensure_stream(nc, unique)
        await js.publish(
            f"out{unique}.eu.new",
            orjson.dumps({"n": 7, "customer": {"id": "c/17 a"}}),
            headers={"X-Trace": "t-1"},
        )
        # No customer id: the URL cannot be built, retrying will not help.
        await js.publish(f"out{unique}.eu.new", orjson.dumps({"n": 8}), headers={"X-Trace": "t"})
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    [seen] = receiver.seen
    assert seen.method == "PUT"
    assert seen.path == "/customers/c/17 a/orders/7"  # the server decoded the %2F and %20
    assert seen.query == "region=eu"
    assert (seen.headers["x-region"], seen.headers["x-trace"], seen.headers["x-fixed"]) == (
        "eu",
        "t-1",
        "v1",
    )
    [dead] = await dead_letters(nc, unique)
    assert "{body.customer.id} of template" in dead["Busway-Error"]
    assert "is missing" in dead["Busway-Error"]


async def test_percent_encoding_keeps_a_value_in_its_path_segment(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    seen_raw: list[bytes] = []
    receiver = Receiver()
    app = receiver.app()

    async def raw_path(scope, receive, send):  # type: ignore[no-untyped-def]
        seen_raw.append(scope["raw_path"])
        await app(scope, receive, send)

    async with serving(raw_path) as base:  # type: ignore[arg-type]
        url = f"{base}/c/{{body.id}}"
        config = decode_test_config(sink_config(nats_server, unique, url), tmp_path)
        await ensure_stream(nc, unique)
        await nc.jetstream().publish(f"out{unique}.x", orjson.dumps({"id": "a/b?c"}))
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    assert seen_raw == [b"/c/a%2Fb%3Fc"]


async def test_concurrency_bounds_requests_in_flight(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver(hold_until=4)
    async with serving(receiver.app()) as base:
        config = decode_test_config(
            sink_config(nats_server, unique, f"{base}/h", 'concurrency = 4\nbatch_wait = "1s"'),
            tmp_path,
        )
        ids = await publish(nc, f"out{unique}.x", 24)
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    assert receiver.max_in_flight == 4
    assert receiver.handled == dict.fromkeys(ids, 1)


async def test_an_unreachable_receiver_is_retried_until_it_listens(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    port = free_port()
    config = decode_test_config(
        sink_config(nats_server, unique, f"http://127.0.0.1:{port}/h"), tmp_path
    )
    ids = await publish(nc, f"out{unique}.x", 3)
    receiver = Receiver()
    async with Bus(config) as bus:
        stats = bus.metrics.stats[0]

        async def failing() -> bool:
            return stats.retried >= 3

        await eventually(failing)
        assert bus.readiness()[f"sink:hook{unique}"] is False
        async with serving(receiver.app(), port):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
            assert bus.readiness()[f"sink:hook{unique}"] is True
        assert stats.dead_lettered == 0
    assert receiver.handled == dict.fromkeys(ids, 1)


@pytest.mark.parametrize(
    ("mode", "content_type"),
    [("json-array", "application/json"), ("ndjson", "application/x-ndjson")],
)
async def test_batches_go_in_one_request_each(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    mode: str,
    content_type: str,
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        extra = f'batch = "{mode}"\nbatch_max = 4\nbatch_wait = "300ms"'
        config = decode_test_config(sink_config(nats_server, unique, f"{base}/h", extra), tmp_path)
        await publish(nc, f"out{unique}.x", 10)
        async with Bus(config) as bus:
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
            assert bus.metrics.stats[0].published == 10
    delivered: list[int] = []
    for seen in receiver.seen:
        assert seen.headers["content-type"] == content_type
        if mode == "ndjson":
            items = [orjson.loads(line) for line in seen.body.splitlines()]
        else:
            items = orjson.loads(seen.body)
        assert 1 <= len(items) <= 4
        delivered.extend(item["n"] for item in items)
        assert seen.headers["idempotency-key"].startswith("batch:") or len(items) == 1
    assert sorted(delivered) == list(range(10))  # all, and none twice
    assert len(receiver.seen) < 10


async def test_cloudevents_binary_mode_puts_attributes_in_headers(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        extra = 'cloudevents = "binary"\nevent_source = "/busway/test"'
        config = decode_test_config(sink_config(nats_server, unique, f"{base}/h", extra), tmp_path)
        js = nc.jetstream()
        await ensure_stream(nc, unique)
        await js.publish(f"out{unique}.created", b'{"n": 1}', headers={"Nats-Msg-Id": "plain-1"})
        await js.publish(
            f"out{unique}.created",
            b'{"n": 2}',
            headers={
                "ce-specversion": "1.0",
                "ce-id": "evt-2",
                "ce-source": "/crm",
                "ce-type": "com.example.created",
                "ce-tenant": "acme%20corp",
            },
        )
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    by_body = {orjson.loads(s.body)["n"]: s.headers for s in receiver.seen}
    plain, event = by_body[1], by_body[2]
    assert (plain["ce-id"], plain["ce-source"], plain["ce-type"]) == (
        "plain-1",
        "/busway/test",
        f"out{unique}.created",
    )
    assert plain["ce-specversion"] == "1.0"
    assert (event["ce-id"], event["ce-source"], event["ce-type"]) == (
        "evt-2",
        "/crm",
        "com.example.created",
    )
    assert event["ce-tenant"] == "acme%20corp"
    assert event["content-type"] == "application/json"


async def test_cloudevents_structured_mode_wraps_the_body(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    receiver = Receiver()
    async with serving(receiver.app()) as base:
        extra = 'cloudevents = "structured"\nbody = "raw"'
        config = decode_test_config(sink_config(nats_server, unique, f"{base}/h", extra), tmp_path)
        js = nc.jetstream()
        await ensure_stream(nc, unique)
        await js.publish(
            f"out{unique}.x",
            b'{"n": 1}',
            headers={"Nats-Msg-Id": "j-1", "Content-Type": "application/json", "ce-tenant": "a"},
        )
        await js.publish(
            f"out{unique}.x", b"\x00\x01", headers={"Nats-Msg-Id": "b-1", "Content-Type": "x/y"}
        )
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    events = {}
    for seen in receiver.seen:
        assert seen.headers["content-type"] == "application/cloudevents+json"
        event = orjson.loads(seen.body)
        events[event["id"]] = event
    assert events["j-1"] == {
        "specversion": "1.0",
        "id": "j-1",
        "source": f"urn:busway:sink:hook{unique}",
        "type": f"out{unique}.x",
        "tenant": "a",
        "datacontenttype": "application/json",
        "data": {"n": 1},
    }
    assert events["b-1"]["data_base64"] == base64.b64encode(b"\x00\x01").decode()
    assert events["b-1"]["datacontenttype"] == "x/y"


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ('url = "https://{subject[1]}.example/x"', "scheme and host must be literal"),
        ('url = "https://crm/{body.a..b}"', "empty key"),
        ('url = "https://crm/{nope}"', "unknown field {nope}"),
        ('url = "ftp://crm/x"', "must start with http"),
        ('url = "https://crm/x"\nsigning_secret = "s3cret"', "whsec_"),
        ('url = "https://crm/x"\nbatch = "ndjson"\nbody = "raw"', "raw bodies cannot be joined"),
        (
            'url = "https://crm/x"\nbatch = "ndjson"\ncloudevents = "binary"',
            "cannot be batched",
        ),
        ('url = "https://crm/x"\nheaders = { Idempotency-Key = "x" }', "set by the sink"),
    ],
)
def test_bad_sink_configs_are_refused_with_the_reason(
    nats_server: NatsServer, tmp_path: Path, extra: str, expected: str
) -> None:
    text = sink_config(nats_server, "u", "https://crm/x").replace('url = "https://crm/x"', extra)
    with pytest.raises(ConfigError, match="sinks") as caught:
        decode_test_config(text, tmp_path)
    assert expected in str(caught.value)


def test_signature_matches_the_specification_by_hand() -> None:
    signer = WebhookSigner(SECRET, clock=lambda: 1_700_000_000.9)
    headers = signer.headers("msg_1", b'{"a":1}')
    key = base64.b64decode(SECRET.removeprefix("whsec_"))
    expected = hmac.new(key, b'msg_1.1700000000.{"a":1}', hashlib.sha256).digest()
    assert headers == {
        "webhook-id": "msg_1",
        "webhook-timestamp": "1700000000",
        "webhook-signature": "v1," + base64.b64encode(expected).decode(),
    }


async def test_max_in_flight_1_keeps_stream_order_across_retries(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Strict order: with one message held at a time, a failed message is retried before any
    later one is delivered (JetStream keeps a naked message pending until it is acked)."""
    accepted: list[int] = []
    attempts: dict[int, int] = {}

    def respond(seen: Seen) -> Response:
        n = orjson.loads(seen.body)["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if n % 3 == 0 and attempts[n] <= 2:  # every third message fails twice
            return Response(b"busy", status_code=503)
        accepted.append(n)
        return Response(b"", status_code=204)

    receiver = Receiver(respond)
    async with serving(receiver.app()) as base:
        config = decode_test_config(
            sink_config(nats_server, unique, f"{base}/ordered", "max_in_flight = 1"), tmp_path
        )
        ids = await publish(nc, f"out{unique}.orders", 30)
        async with Bus(config):
            await wait_settled(nc, f"OUT_{unique}", f"busway-sink-hook{unique}")
    assert accepted == list(range(30))
    assert receiver.handled == dict.fromkeys(ids, 1)
    assert sum(attempts.values()) == 30 + 2 * 10
