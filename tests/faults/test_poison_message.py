"""A poison message: a Python transform raises on it every time, among 2,000 good ones.

It must be tried exactly `max_attempts` times, then land in the dead-letter stream once, body
untouched, with the function and error named; the other messages flow through as if it were
not there: every one of them in the output stream once.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

TOTAL = 2_000
POISON = {137, 1500}
MAX_ATTEMPTS = 4

calls: Counter[int] = Counter()


def handle(body: dict[str, Any]) -> dict[str, Any]:
    """The user's transform: fails on a poison order every time it sees it."""
    calls[body["id"]] += 1
    if body.get("poison"):
        raise ValueError(f"cannot price order {body['id']}")
    return {"id": body["id"], "price": body["id"] * 2}


async def test_poison_message_is_dead_lettered_after_max_attempts_and_the_rest_flows(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    calls.clear()
    config = decode_test_config(
        config_toml(
            nats_server,
            streams=[
                stream_table(f"PIN_{unique}", f"pin{unique}.>"),
                stream_table(f"POUT_{unique}", f"pout{unique}.>"),
            ],
        )
        + f"""
[[routes]]
name = "price{unique}"
from = "pin{unique}.orders"
to = ["pout{unique}.priced"]
retry = {{ max_attempts = {MAX_ATTEMPTS}, backoff = "20ms", max_backoff = "100ms" }}
stages = [{{ python = "tests.faults.test_poison_message:handle" }}]
""",
        tmp_path,
    )
    js = nc.jetstream(publish_async_max_pending=500)
    bodies = {n: orjson.dumps({"id": n, "poison": n in POISON}) for n in range(TOTAL)}
    async with Bus(config) as bus:
        for n in range(TOTAL):
            await js.publish_async(f"pin{unique}.orders", bodies[n])
        await js.publish_async_completed()
        await wait_settled(nc, f"PIN_{unique}", f"busway-route-price{unique}")
        stats = bus.metrics.stats[0]

    outputs = [orjson.loads(m.data)["id"] for m in await stream_messages(nc, f"POUT_{unique}")]
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.price{unique}"
    ]
    good = sorted(set(range(TOTAL)) - POISON)
    Figures.of(
        "poison",
        good,
        outputs,
        poison=len(POISON),
        dead_lettered=len(dead),
        poison_calls=sorted(calls[n] for n in POISON),
        retried=stats.retried,
    ).report()

    assert sorted(outputs) == good  # every good message once, none lost, none doubled
    assert all(calls[n] == 1 for n in good)
    assert {n: calls[n] for n in POISON} == dict.fromkeys(POISON, MAX_ATTEMPTS)
    assert stats.dead_lettered == len(POISON)
    assert sorted(m.data for m in dead) == sorted(bodies[n] for n in POISON)  # body untouched
    for message in dead:
        headers = message.headers or {}
        n = orjson.loads(message.data)["id"]
        assert headers["Busway-Error-Reason"] == "max_attempts"
        # Handled MAX_ATTEMPTS times; the last failure dead-letters it at once.
        assert headers["Busway-Attempts"] == str(MAX_ATTEMPTS)
        assert f"gave up after {MAX_ATTEMPTS} attempt(s)" in headers["Busway-Error"]
        assert headers["Busway-Original-Subject"] == f"pin{unique}.orders"
        assert headers["Busway-Original-Stream"] == f"PIN_{unique}"
        assert (
            f"tests.faults.test_poison_message:handle raised ValueError: cannot price order {n}"
            in headers["Busway-Error"]
        )
