"""A route cycle only failures open: dead letters re-fed into the input, through `busway run`.

`price` dead-letters an order whose total is not a number; `refeed` puts `price`'s dead letters
back on its input (a well-meant "retry dead letters" route). No static check can tell that a
message will fail every time, so `busway check` accepts the config, notes the cycle, and both
routes count hops. One bad POST must then cost a bounded number of messages (the default
`hop_limit`, 32, laps) and end in a dead letter with reason `hop_limit`, while a good order
beside it flows through once. Before hop counting, such a POST looped forever (one POST made
14,017 messages in 10 s).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import orjson
import pytest

from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, consumer_settled, read_stream
from tests.support import Daemon, NatsServer, eventually, free_port, run_cli

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

HOP_LIMIT = 32  # the default


def daemon_config(nats_url: str, http_port: int) -> str:
    return (
        config_toml(
            nats_url,
            top='shutdown_timeout = "5s"',
            http=f"127.0.0.1:{http_port}",
            streams=[
                stream_table("CYCLE_IN", "cyclein.>"),
                stream_table("CYCLE_OUT", "cycleout.>"),
            ],
        )
        + """
[[sources]]
name = "ingest"
type = "http"
path = "/orders"
subject = "cyclein.orders"

[[routes]]
name = "price"
from = "cyclein.orders"
transform = "{id: id, price: abs(total)}"
to = ["cycleout.priced"]

[[routes]]
name = "refeed"
from = "busway.deadletter.price"
to = ["cyclein.orders"]
"""
    )


async def test_one_bad_post_in_a_dead_letter_cycle_costs_a_bounded_number_of_messages(
    tmp_path: Path,
) -> None:
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store)
    http_port = free_port()
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url, http_port))
    checked = run_cli("check", str(config))
    assert checked.returncode == 0, checked.stderr
    assert "note: route 'price' → route 'refeed' → route 'price' can form a cycle" in (
        checked.stdout
    )
    daemon = Daemon(config, log=tmp_path / "daemon.log")

    async def dead_lettered_by_refeed() -> bool:
        return any(
            m.subject == "busway.deadletter.refeed"
            for m in await read_stream(server.url, "BUSWAY_DEADLETTER")
        )

    async def settled() -> bool:
        return await consumer_settled(
            server.url, "CYCLE_IN", "busway-route-price"
        ) and await consumer_settled(server.url, "BUSWAY_DEADLETTER", "busway-route-refeed")

    try:
        daemon.start()
        await daemon.ready()
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"http://127.0.0.1:{http_port}/orders"
            bad = await http.post(url, json={"id": "bad", "total": "ten"})
            good = await http.post(url, json={"id": "good", "total": -10})
        assert (bad.status_code, good.status_code) == (202, 202)
        await eventually(dead_lettered_by_refeed)
        await eventually(settled)
        assert await daemon.stop() == 0
        inputs = await read_stream(server.url, "CYCLE_IN")
        outputs = await read_stream(server.url, "CYCLE_OUT")
        dead = await read_stream(server.url, "BUSWAY_DEADLETTER")
    finally:
        daemon.kill()
        server.stop()
    log = daemon.output()
    bad_inputs = [m for m in inputs if orjson.loads(m.data)["id"] == "bad"]
    by_price = [m for m in dead if m.subject == "busway.deadletter.price"]
    by_refeed = [m for m in dead if m.subject == "busway.deadletter.refeed"]
    Figures.of(
        "route-cycle",
        ["good"],
        [orjson.loads(m.data)["id"] for m in outputs],
        bad_post_messages=len(bad_inputs) + len(by_price) + len(by_refeed),
        hop_limit=HOP_LIMIT,
    ).report()

    assert [orjson.loads(m.data) for m in outputs] == [{"id": "good", "price": 10}]
    # The POST, then one re-fed copy per lap, each lap counted once.
    assert len(bad_inputs) == 1 + HOP_LIMIT
    assert [(m.headers or {}).get("Busway-Hops") for m in bad_inputs] == [
        None,
        *(str(hop) for hop in range(1, HOP_LIMIT + 1)),
    ]
    reasons = [(m.headers or {})["Busway-Error-Reason"] for m in by_price]
    assert reasons == ["expression"] * HOP_LIMIT + ["hop_limit"]
    (final,) = by_refeed
    assert (final.headers or {})["Busway-Error-Reason"] == "hop_limit"
    assert orjson.loads(final.data) == {"id": "bad", "total": "ten"}
    assert "can form a cycle" in log
    assert "Traceback" not in log
