"""The audit trail: every ingress, dead letter and replay recorded once, and read back with
`busway audit`, through a real bus, real HTTP and a real nats-server."""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
from pathlib import Path

import anyio
import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, ConfigError
from busway._observe.audit_read import AuditQuery, iter_audit
from tests.configs import config_toml, dead_letter_table, io_streams
from tests.support import NatsServer, decode_test_config, eventually, run_cli, stream_messages

pytestmark = pytest.mark.anyio

ACME_KEY = "acme-key-0123456789abcdef"


def config_text(server: NatsServer, unique: str, *, audit: bool = True) -> str:
    digest = hashlib.sha256(ACME_KEY.encode()).hexdigest()
    table = (
        f'[audit]\nenabled = true\nstream = "AUD_{unique}"\nsubject_prefix = "aud{unique}"\n'
        if audit
        else ""
    )
    return (
        config_toml(server, streams=io_streams(unique), dead_letter=unique, body=table)
        + f"""
[[sources]]
name = "api"
type = "http"
path = "/orders"
subject = "in{unique}.orders"
cloudevents = true

[sources.auth]
api_keys = [{{ name = "acme", hash = "sha256:{digest}" }}]

[[routes]]
name = "big"
from = "in{unique}.orders"
when = "total > `100`"
to = ["out{unique}.big"]
"""
    )


async def audit_records(nc: NatsClient, unique: str) -> list[dict[str, object]]:
    return [orjson.loads(m.data) for m in await stream_messages(nc, f"AUD_{unique}")]


async def test_every_ingress_is_recorded_once_with_principal_client_and_message_id(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server, unique), tmp_path)
    event = {
        "specversion": "1.0",
        "id": "evt-1",
        "source": "/shop",
        "type": "order",
        "data": {"total": 5},
    }
    async with Bus(config) as bus:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            headers = {"X-API-Key": ACME_KEY}
            first = await http.post("/orders", json={"total": 250}, headers=headers)
            # The same CloudEvent twice: one message (its id is the event's), one record.
            event_headers = {**headers, "content-type": "application/cloudevents+json"}
            again = [
                await http.post("/orders", content=orjson.dumps(event), headers=event_headers)
                for _ in range(2)
            ]
            refused = await http.post("/orders", json={"total": 1})  # no key: 401, no record
        assert first.status_code == 202
        assert [answer.status_code for answer in again] == [202, 202]
        assert again[1].json()["duplicate"] is True
        assert refused.status_code == 401

        async def both_recorded() -> bool:
            return len(await audit_records(nc, unique)) >= 2

        await eventually(both_recorded)
    records = await audit_records(nc, unique)
    assert len(records) == 2, records  # the duplicate ingress was deduplicated by its id
    plain, event_record = records
    assert plain["kind"] == "ingress"
    assert plain["source"] == "api"
    assert plain["subject"] == f"in{unique}.orders"
    assert plain["message_id"] == first.json()["id"]
    assert plain["principal"] == "acme"
    assert plain["client"] == "127.0.0.1"
    assert plain["stream"] == f"IN_{unique}"
    assert plain["seq"] == first.json()["seq"]
    assert datetime.datetime.fromisoformat(str(plain["time"])).tzinfo is not None
    assert event_record["message_id"] == again[0].json()["id"]
    assert "duplicate" not in event_record


async def test_dead_letters_and_replays_are_recorded_with_who_and_why(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config_file = tmp_path / "busway.toml"
    config_file.write_text(config_text(nats_server, unique))
    config = decode_test_config(config_file.read_text(), tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await js.publish(
            f"in{unique}.orders", b"not json", headers={"Nats-Msg-Id": f"bad-{unique}"}
        )

        async def dead_lettered() -> bool:
            return any(r["kind"] == "deadletter" for r in await audit_records(nc, unique))

        await eventually(dead_lettered)
        replay = await anyio.to_thread.run_sync(
            functools.partial(
                run_cli,
                "dlq",
                "replay",
                str(config_file),
                "--route",
                "big",
                "--why",
                "INC-42: parser fixed",
            )
        )
        assert replay.returncode == 0, replay.stdout + replay.stderr
        assert "replayed 1," in replay.stdout

        async def replay_recorded() -> bool:
            return any(r["kind"] == "replay" for r in await audit_records(nc, unique))

        await eventually(replay_recorded)
    records = await audit_records(nc, unique)
    letters = [r for r in records if r["kind"] == "deadletter"]
    replays = [r for r in records if r["kind"] == "replay"]
    assert letters[0]["component"] == "big"
    assert letters[0]["component_kind"] == "route"
    assert letters[0]["reason"] == "decode"
    assert letters[0]["subject"] == f"in{unique}.orders"
    assert letters[0]["message_id"] == f"bad-{unique}"
    assert len(replays) == 1
    assert replays[0]["why"] == "INC-42: parser fixed"
    assert replays[0]["component"] == "big"
    assert replays[0]["target"] == f"in{unique}.orders"
    assert replays[0]["user"]
    assert replays[0]["host"]

    # Read back with the command, filtered by kind; one JSON object per line.
    listed = await anyio.to_thread.run_sync(
        functools.partial(run_cli, "audit", str(config_file), "--kind", "replay", "--json")
    )
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["why"] for line in lines] == ["INC-42: parser fixed"]


async def test_audit_reads_by_time_principal_and_subject(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(config_text(nats_server, unique), tmp_path)
    async with (
        Bus(config) as bus,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http,
    ):
        headers = {"X-API-Key": ACME_KEY}
        await http.post("/orders", json={"total": 1}, headers=headers)

        async def first_recorded() -> bool:
            return len(await audit_records(nc, unique)) == 1

        await eventually(first_recorded)
        between = datetime.datetime.now(datetime.UTC)
        second = await http.post("/orders", json={"total": 2}, headers=headers)

        async def second_recorded() -> bool:
            return len(await audit_records(nc, unique)) == 2

        await eventually(second_recorded)
        js = nc.jetstream()

        async def read(query: AuditQuery) -> list[object]:
            return [r["message_id"] async for r in iter_audit(nc, js, config, query)]

        assert await read(AuditQuery(since=between)) == [second.json()["id"]]
        assert len(await read(AuditQuery(until=between))) == 1
        assert len(await read(AuditQuery(principal="acme"))) == 2
        assert await read(AuditQuery(principal="someone-else")) == []
        assert len(await read(AuditQuery(subject=f"in{unique}.>"))) == 2
        assert await read(AuditQuery(subject="other.>")) == []
        assert await read(AuditQuery(since=datetime.datetime.now(datetime.UTC))) == []


async def test_without_audit_nothing_is_recorded_and_the_command_says_how_to_enable_it(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config_file = tmp_path / "busway.toml"
    config_file.write_text(config_text(nats_server, unique, audit=False))
    config = decode_test_config(config_file.read_text(), tmp_path)
    async with Bus(config) as bus:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            answer = await http.post("/orders", json={"total": 1}, headers={"X-API-Key": ACME_KEY})
        assert answer.status_code == 202
    names = [name async for name in _stream_names(nc)]
    assert f"AUD_{unique}" not in names and "BUSWAY_AUDIT" not in names
    listed = await anyio.to_thread.run_sync(functools.partial(run_cli, "audit", str(config_file)))
    assert listed.returncode == 2
    assert "[audit] enabled = true" in listed.stderr


async def _stream_names(nc: NatsClient):  # type: ignore[no-untyped-def]
    for info in await nc.jetstream().streams_info():
        yield info.config.name


def test_an_audit_prefix_that_overlaps_a_stream_is_refused(tmp_path: Path) -> None:
    text = """
[audit]
enabled = true
subject_prefix = "orders.audit"

[[streams]]
name = "ORDERS"
subjects = ["orders.>"]
"""
    with pytest.raises(ConfigError, match="audit records go"):
        decode_test_config(text, tmp_path)


async def test_a_request_reply_request_is_recorded_as_ingress(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    digest = hashlib.sha256(ACME_KEY.encode()).hexdigest()
    text = f"""
[nats]
servers = ["{nats_server.url}"]

[audit]
enabled = true
stream = "AUD_{unique}"
subject_prefix = "aud{unique}"

{dead_letter_table(unique)}

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[sources]]
name = "quote"
type = "http"
path = "/quote"
subject = "in{unique}.quote"
reply_timeout = "10s"

[sources.auth]
api_keys = [{{ name = "acme", hash = "sha256:{digest}" }}]

[[routes]]
name = "answer"
from = "in{unique}.quote"
stages = [{{ reply = "{{price: `42`}}" }}]
"""
    config = decode_test_config(text, tmp_path)
    async with (
        Bus(config) as bus,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http,
    ):
        answer = await http.post("/quote", json={"sku": "a"}, headers={"X-API-Key": ACME_KEY})
        assert answer.status_code == 200
        assert answer.json() == {"price": 42}

        async def recorded() -> bool:
            return len(await audit_records(nc, unique)) == 1

        await eventually(recorded)
    (record,) = await audit_records(nc, unique)
    assert record["kind"] == "ingress"
    assert record["source"] == "quote"
    assert record["principal"] == "acme"
    assert record["client"] == "127.0.0.1"
    assert str(record["message_id"]).startswith("quote:")


async def test_a_file_source_records_each_line_and_its_dead_letter(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    text = f"""
[nats]
servers = ["{nats_server.url}"]

[audit]
enabled = true
stream = "AUD_{unique}"
subject_prefix = "aud{unique}"

{dead_letter_table(unique)}

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[sources]]
name = "drop"
type = "file"
path = "inbox"
patterns = ["*.jsonl"]
format = "jsonl"
ready = "rename"
subject = "in{unique}.rows"
"""
    config = decode_test_config(text, tmp_path)
    async with Bus(config):
        staged = tmp_path / "orders.tmp"
        staged.write_bytes(b'{"n": 1}\nnot json\n{"n": 3}\n')
        staged.rename(inbox / "orders.jsonl")

        async def recorded() -> bool:
            return len(await audit_records(nc, unique)) == 3

        await eventually(recorded)
    records = await audit_records(nc, unique)
    kinds = sorted(str(r["kind"]) for r in records)
    assert kinds == ["deadletter", "ingress", "ingress"]
    ingress = [r for r in records if r["kind"] == "ingress"]
    assert {r["source"] for r in ingress} == {"drop"}
    assert all(str(r["message_id"]).startswith("drop:") for r in ingress)
    assert all(isinstance(r["seq"], int) for r in ingress)
    (letter,) = [r for r in records if r["kind"] == "deadletter"]
    assert letter["component"] == "drop"
    assert letter["component_kind"] == "source"
    assert str(letter["origin"]).endswith(":2")
