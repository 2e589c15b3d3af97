"""What a dead-letter replay reaches: the component that gave up on the message, and only it.

A subject is often read by several consumers: a route and two webhook sinks here. When one sink
dead-letters a message and the operator replays it, the healthy siblings already handled the
original; a replay that re-fed them would deliver it twice. And the partner of the failed sink
must see the same idempotency key (`Idempotency-Key`, Standard Webhooks `webhook-id`) as for
the first attempt, whatever new `Nats-Msg-Id` the replayed copy got.
"""

from __future__ import annotations

import base64
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, StreamConfig
from starlette.responses import Response

from busway import Bus
from busway._dlq.read import list_dead_letters
from busway._dlq.replay import replay_dead_letters
from tests.configs import config_toml, io_streams, stream_table
from tests.http_support import Receiver, Seen, serving
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled

pytestmark = pytest.mark.anyio

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef01234567").decode()


def fan_out_config(server: NatsServer, unique: str, hook: str, audit: str) -> str:
    """`in<u>.orders` is read by a route (`copy`) and two HTTP sinks (`hook`, `audit`)."""
    return (
        config_toml(
            server,
            dead_letter=unique,
            streams=io_streams(unique),
        )
        + f"""
[[routes]]
name = "copy{unique}"
from = "in{unique}.orders"
to = ["out{unique}.copied"]

[[sinks]]
name = "hook{unique}"
type = "http"
from = "in{unique}.orders"
url = "{hook}/hook"
signing_secret = "{SECRET}"

[[sinks]]
name = "audit{unique}"
type = "http"
from = "in{unique}.orders"
url = "{audit}/audit"
"""
    )


async def settle(nc: NatsClient, unique: str) -> None:
    for durable in (f"busway-route-copy{unique}", f"busway-sink-hook{unique}"):
        await wait_settled(nc, f"IN_{unique}", durable)
    await wait_settled(nc, f"IN_{unique}", f"busway-sink-audit{unique}")


async def test_a_replay_reaches_only_the_failed_sink_with_the_original_idempotency_key(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    fixed = False

    def partner(seen: Seen) -> Response:
        # Refuses orders 1 and 2 (a customer it does not know yet) until it is fixed.
        if not fixed and orjson.loads(seen.body)["n"] in (1, 2):
            return Response(b'{"error": "customer unknown"}', status_code=422)
        return Response(b"", status_code=200)

    hook, audit = Receiver(partner), Receiver()
    js = nc.jetstream()
    async with serving(hook.app()) as hook_url, serving(audit.app()) as audit_url:
        text = fan_out_config(nats_server, unique, hook_url, audit_url)
        config = decode_test_config(text, tmp_path)
        async with Bus(config) as bus:
            subject = f"in{unique}.orders"
            await js.publish(subject, b'{"n": 0}', headers={"Nats-Msg-Id": "order-0"})
            await js.publish(subject, b'{"n": 1}', headers={"Nats-Msg-Id": "order-1"})
            await js.publish(subject, b'{"n": 2}')  # no id: sinks know it as <stream>:<seq>
            await settle(nc, unique)
            first = await list_dead_letters(js, config)
            assert [(d.component, d.kind) for d in first] == [(f"hook{unique}", "sink")] * 2

            # Replayed too early, refused again: the new dead letters keep the first identity.
            await replay_dead_letters(js, config, component=f"hook{unique}")
            await settle(nc, unique)
            letters = await list_dead_letters(js, config)
            assert [d.replay_count for d in letters] == [1, 1]

            fixed = True
            report = await replay_dead_letters(js, config, component=f"hook{unique}")
            await settle(nc, unique)
            stats = {s.name: s for s in bus.metrics.stats}

    third = f"IN_{unique}:3"
    assert [d.original_id for d in first] == [d.original_id for d in letters] == ["order-1", third]
    assert [o.seq for o in report.replayed] == [d.seq for d in letters]
    assert (report.failed, report.skipped) == ([], [])
    assert await list_dead_letters(js, config) == []

    # The failed sink's partner: each refused order twice more, under the same key as before.
    keys = [(s.headers["idempotency-key"], s.headers["webhook-id"]) for s in hook.seen]
    assert sorted(keys) == sorted(
        [("order-0", "order-0")] + [("order-1", "order-1"), (third, third)] * 3
    )
    assert hook.handled == {"order-0": 1, "order-1": 1, third: 1}

    # The healthy siblings got each order once: no second copy from the replay.
    assert sorted(orjson.loads(s.body)["n"] for s in audit.seen) == [0, 1, 2]
    assert audit.handled == {"order-0": 1, "order-1": 1, third: 1}
    copied = await stream_messages(nc, f"OUT_{unique}")
    assert sorted(orjson.loads(m.data)["n"] for m in copied) == [0, 1, 2]
    for name in (f"copy{unique}", f"audit{unique}"):
        assert (stats[name].filtered, stats[name].events.get("replay_skipped")) == (4, 4)
    assert stats[f"hook{unique}"].events.get("replay_skipped") is None


def chain_config(server: NatsServer, unique: str, url: str) -> str:
    """`fwd` forwards `in<u>.x` to `mid<u>.x` (a stream the test owns); `hook` delivers it."""
    return (
        config_toml(
            server,
            publish_timeout="1s",
            dead_letter=unique,
            streams=[
                stream_table(f"IN_{unique}", f"in{unique}.>"),
                stream_table(f"MID_{unique}", f"mid{unique}.>", create=False),
            ],
        )
        + f"""
[[routes]]
name = "fwd{unique}"
from = "in{unique}.x"
to = ["mid{unique}.x"]
retry = {{ max_attempts = 2, backoff = "50ms", max_backoff = "100ms" }}

[[sinks]]
name = "hook{unique}"
type = "http"
from = "mid{unique}.x"
url = "{url}/hook"
"""
    )


async def test_a_replayed_routes_outputs_reach_their_consumers_unaddressed(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """The replay addressing belongs to the replayed input: outputs must not inherit it,
    or the consumers downstream would skip them as replays meant for the route."""
    receiver = Receiver()
    js = nc.jetstream()
    mid = f"MID_{unique}"
    full = StreamConfig(
        name=mid, subjects=[f"mid{unique}.>"], max_msgs=1, discard=DiscardPolicy.NEW
    )
    await js.add_stream(full)
    await js.publish(f"mid{unique}.filler", b"takes the only place")  # the route is refused
    async with serving(receiver.app()) as url:
        config = decode_test_config(chain_config(nats_server, unique, url), tmp_path)
        async with Bus(config):
            await js.publish(f"in{unique}.x", b'{"n": 7}', headers={"Nats-Msg-Id": "seven"})
            await wait_settled(nc, f"IN_{unique}", f"busway-route-fwd{unique}")
            [letter] = await list_dead_letters(js, config)
            assert (letter.kind, letter.reason) == ("route", "max_attempts")

            await js.purge_stream(mid)
            await js.update_stream(StreamConfig(name=mid, subjects=[f"mid{unique}.>"]))
            report = await replay_dead_letters(js, config)
            await wait_settled(nc, f"IN_{unique}", f"busway-route-fwd{unique}")
            await wait_settled(nc, mid, f"busway-sink-hook{unique}")

    assert [o.seq for o in report.replayed] == [letter.seq]
    [output] = await stream_messages(nc, mid)
    assert output.data == b'{"n": 7}'
    assert not {"Busway-Replay-For", "Busway-Replay-Msg-Id"} & set(output.headers or {})
    assert [orjson.loads(s.body) for s in receiver.seen] == [{"n": 7}]


async def test_a_replay_for_a_component_no_longer_configured_is_skipped(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Addressed to a sink that is gone, a replay would be acked unprocessed by every other
    consumer: it is skipped instead, and the dead letter stays."""

    def refuse(_: Seen) -> Response:
        return Response(b"", status_code=400)

    hook, audit = Receiver(refuse), Receiver()
    js = nc.jetstream()
    async with serving(hook.app()) as hook_url, serving(audit.app()) as audit_url:
        text = fan_out_config(nats_server, unique, hook_url, audit_url)
        config = decode_test_config(text, tmp_path)
        async with Bus(config):
            await js.publish(f"in{unique}.orders", b'{"n": 1}', headers={"Nats-Msg-Id": "o1"})
            await settle(nc, unique)
    [letter] = await list_dead_letters(js, config)
    without_hook = (
        text.split('[[sinks]]\nname = "hook')[0] + "[[sinks]]" + text.split("[[sinks]]")[2]
    )
    smaller = decode_test_config(without_hook, tmp_path)
    assert [s.name for s in smaller.sinks] == [f"audit{unique}"]
    moved = decode_test_config(
        text.replace(f'from = "in{unique}.orders"\nurl = "{hook_url}', f'from = "in{unique}.'
        f'other"\nurl = "{hook_url}'),
        tmp_path,
    )  # fmt: skip

    gone = await replay_dead_letters(js, smaller)
    elsewhere = await replay_dead_letters(js, moved)

    assert [(o.seq, o.detail) for o in gone.skipped] == [
        (
            letter.seq,
            f"sink 'hook{unique}' is not in this config, so nothing would process the replay: "
            "replay with --to SUBJECT",
        )
    ]
    assert [(o.seq, o.detail) for o in elsewhere.skipped] == [
        (
            letter.seq,
            f"sink 'hook{unique}' no longer reads 'in{unique}.orders' (its `from` is "
            f"'in{unique}.other'): replay with --to SUBJECT",
        )
    ]
    assert gone.replayed == elsewhere.replayed == []
    assert await list_dead_letters(js, config) == [letter]


def split_output_config(server: NatsServer, unique: str) -> str:
    """`both` writes each input to `ok<u>.x` (a stream with room) and `mid<u>.x` (the test's)."""
    return (
        config_toml(
            server,
            publish_timeout="1s",
            dead_letter=unique,
            streams=[
                stream_table(f"IN_{unique}", f"in{unique}.>"),
                stream_table(f"OK_{unique}", f"ok{unique}.>"),
                stream_table(f"MID_{unique}", f"mid{unique}.>", create=False),
            ],
        )
        + f"""
[[routes]]
name = "both{unique}"
from = "in{unique}.x"
to = ["ok{unique}.x", "mid{unique}.x"]
retry = {{ max_attempts = 2, backoff = "50ms", max_backoff = "100ms" }}
"""
    )


async def test_a_replayed_route_republishes_the_outputs_it_had_stored_under_the_same_ids(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """A route that stored one output and gave up on the other: its replay publishes both
    again, under the ids of the first attempt, so the stored one is not stored twice."""
    js = nc.jetstream()
    mid = f"MID_{unique}"
    await js.add_stream(
        StreamConfig(name=mid, subjects=[f"mid{unique}.>"], max_msgs=1, discard=DiscardPolicy.NEW)
    )
    await js.publish(f"mid{unique}.filler", b"takes the only place")  # the second output fails
    config = decode_test_config(split_output_config(nats_server, unique), tmp_path)
    async with Bus(config):
        await js.publish(f"in{unique}.x", b'{"n": 8}')
        await wait_settled(nc, f"IN_{unique}", f"busway-route-both{unique}")
        [letter] = await list_dead_letters(js, config)
        assert (letter.kind, letter.reason) == ("route", "max_attempts")

        await js.purge_stream(mid)
        await js.update_stream(StreamConfig(name=mid, subjects=[f"mid{unique}.>"]))
        report = await replay_dead_letters(js, config)
        await wait_settled(nc, f"IN_{unique}", f"busway-route-both{unique}")

    assert [o.seq for o in report.replayed] == [letter.seq]
    [kept] = await stream_messages(nc, f"OK_{unique}")  # stored on the first attempt, once
    [late] = await stream_messages(nc, mid)
    assert kept.data == late.data == b'{"n": 8}'
    assert kept.headers is not None and late.headers is not None
    first_place = f"IN_{unique}:{letter.original_seq}:both{unique}"
    assert kept.headers["Nats-Msg-Id"] == f"{first_place}:0"
    assert late.headers["Nats-Msg-Id"] == f"{first_place}:1"
    assert "Busway-Replay-Origin" not in kept.headers | late.headers
