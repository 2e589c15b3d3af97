"""A cycle of routes that a condition keeps open is cut at run time by the hop count.

Two routes feed each other; `ping` forwards only messages with `again` set, so `busway check`
accepts the config and counts hops on both. One looping message then makes exactly
`hop_limit` route hops and is dead-lettered with reason `hop_limit`: bounded, not 14,000
messages in ten seconds.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.support import (
    NatsServer,
    decode_test_config,
    eventually,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio

HOP_LIMIT = 5


def cycle_config(server: NatsServer, unique: str, *, pong: bool = True) -> str:
    text = (
        config_toml(
            server, streams=[stream_table(f"LOOP_{unique}", f"a{unique}.>", f"b{unique}.>")]
        )
        + f"""
[[routes]]
name = "ping{unique}"
from = "a{unique}.in"
when = "again"
to = ["b{unique}.in"]
hop_limit = {HOP_LIMIT}
"""
    )
    if pong:
        text += f"""
[[routes]]
name = "pong{unique}"
from = "b{unique}.in"
to = ["a{unique}.in"]
hop_limit = {HOP_LIMIT}
"""
    return text


async def dead_letters_of(nc: NatsClient, component: str) -> list[dict[str, str]]:
    return [
        dict(message.headers or {})
        for message in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if message.subject == f"busway.deadletter.{component}"
    ]


async def run_one_looping_message(nc: NatsClient, unique: str) -> None:
    await nc.jetstream().publish(f"a{unique}.in", orjson.dumps({"again": True, "id": 1}))

    async def dead_lettered() -> bool:
        return len(await dead_letters_of(nc, f"pong{unique}")) == 1

    await eventually(dead_lettered)
    await wait_settled(nc, f"LOOP_{unique}", f"busway-route-ping{unique}")
    await wait_settled(nc, f"LOOP_{unique}", f"busway-route-pong{unique}")


async def assert_cut_after_the_hop_limit(nc: NatsClient, unique: str) -> None:
    stored = await stream_messages(nc, f"LOOP_{unique}")
    hops = [(m.subject, (m.headers or {}).get("Busway-Hops")) for m in stored]
    # The input, then one output per hop, each hop counted: ping publishes the odd hops, pong
    # the even ones, and pong refuses the message that arrives with 5 hops.
    assert hops == [
        (f"a{unique}.in", None),
        (f"b{unique}.in", "1"),
        (f"a{unique}.in", "2"),
        (f"b{unique}.in", "3"),
        (f"a{unique}.in", "4"),
        (f"b{unique}.in", "5"),
    ]
    (dead,) = await dead_letters_of(nc, f"pong{unique}")
    assert dead["Busway-Error-Reason"] == "hop_limit"
    assert "5 route hops (hop_limit 5)" in dead["Busway-Error"]
    assert dead["Busway-Hops"] == "5"
    assert await dead_letters_of(nc, f"ping{unique}") == []


async def test_a_conditional_cycle_is_cut_after_hop_limit_hops(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(cycle_config(nats_server, unique), tmp_path)
    async with Bus(config) as bus:
        await run_one_looping_message(nc, unique)
        stats = {s.name: s for s in bus.metrics.stats}
        assert stats[f"pong{unique}"].dead_lettered == 1
        assert stats[f"pong{unique}"].errors == {"hop_limit": 1}
    await assert_cut_after_the_hop_limit(nc, unique)


async def test_a_reload_that_closes_a_cycle_restarts_the_routes_in_it_counting(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    before = decode_test_config(cycle_config(nats_server, unique, pong=False), tmp_path)
    after = decode_test_config(cycle_config(nats_server, unique), tmp_path)
    async with Bus(before) as bus:
        report = await bus.reload(after)
        # ping's own settings did not change, but it is now in a cycle: it must count too.
        assert report.changed == [f"route:ping{unique}"]
        assert report.added == [f"route:pong{unique}"]
        await run_one_looping_message(nc, unique)
    await assert_cut_after_the_hop_limit(nc, unique)


async def test_routes_outside_cycles_neither_add_nor_change_the_hop_header(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    config = decode_test_config(
        config_toml(
            nats_server, streams=[stream_table(f"LINE_{unique}", f"in{unique}.>", f"out{unique}.>")]
        )
        + f"""
[[routes]]
name = "line{unique}"
from = "in{unique}.x"
to = ["out{unique}.x"]
""",
        tmp_path,
    )
    js = nc.jetstream()
    async with Bus(config):
        await js.publish(f"in{unique}.x", b"{}")
        await js.publish(f"in{unique}.x", b"{}", headers={"Busway-Hops": "7"})
        await wait_settled(nc, f"LINE_{unique}", f"busway-route-line{unique}")
    outputs = [m for m in await stream_messages(nc, f"LINE_{unique}") if "out" in m.subject]
    assert [(m.headers or {}).get("Busway-Hops") for m in outputs] == [None, "7"]
