"""`python` stages that hang: a blocking one stuck for up to 20 s, an async one forever.

Before, a blocking stage ran on the event loop: while it slept, every route, sink and the HTTP
listener stood still, and an async stage that never returned held its message (and its slot)
until `ack_wait` redelivered it beside the stuck original. Now a blocking stage runs in a
worker thread and an async one under a timeout: the first attempt of each message times out
and is retried like any transient error, the retry goes through, and meanwhile another route
keeps flowing and `/healthz` answers. Every message is delivered exactly once, none is
dead-lettered, and the stuck thread's late result is discarded.
"""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from tests.configs import config_toml, stream_table
from tests.faults.helpers import Figures, read_stream
from tests.support import NatsServer, decode_test_config, eventually, wait_settled

pytestmark = [pytest.mark.anyio, pytest.mark.faults]

STUCK, FLOWING = 4, 200
_seen: Counter[str] = Counter()
_gate = threading.Event()
_blocked = threading.Event()
_inside = 0
"""Blocking calls inside their 20 s wait right now."""
_lock = threading.Lock()


def blocks_first_time(body: dict[str, Any]) -> dict[str, Any]:
    """A blocking call that hangs (up to 20 s) the first time it sees a message."""
    global _inside
    with _lock:
        _seen[f"blocking{body['n']}"] += 1
        first = _seen[f"blocking{body['n']}"] == 1
        _inside += first
    if first:
        _blocked.set()
        _gate.wait(20)
        with _lock:
            _inside -= 1
    return body


async def hangs_first_time(body: dict[str, Any]) -> dict[str, Any]:
    """An async call that never returns the first time it sees a message."""
    _seen[f"hanging{body['n']}"] += 1
    if _seen[f"hanging{body['n']}"] == 1:
        await anyio.sleep_forever()
    return body


async def test_hung_stages_time_out_retry_and_never_stop_the_daemon(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    _gate.clear()
    _blocked.clear()
    config = decode_test_config(
        config_toml(
            nats_server,
            streams=[
                stream_table(f"HUNG_{unique}", f"hung{unique}.in.>"),
                stream_table(f"HUNGOUT_{unique}", f"hung{unique}.out.>"),
            ],
        )
        + f"""
[[routes]]
name = "blocking{unique}"
from = "hung{unique}.in.blocking"
to = ["hung{unique}.out.blocking"]
ack_wait = "2s"
retry = {{ max_attempts = 3, backoff = "50ms", max_backoff = "100ms" }}
stages = [{{ python = {{ function = "tests.faults.test_hung_stage:blocks_first_time", timeout = "200ms" }} }}]

[[routes]]
name = "hanging{unique}"
from = "hung{unique}.in.hanging"
to = ["hung{unique}.out.hanging"]
ack_wait = "2s"
retry = {{ max_attempts = 3, backoff = "50ms", max_backoff = "100ms" }}
stages = [{{ python = {{ function = "tests.faults.test_hung_stage:hangs_first_time", timeout = "200ms" }} }}]

[[routes]]
name = "flow{unique}"
from = "hung{unique}.in.flow"
to = ["hung{unique}.out.flow"]
""",  # noqa: E501 - TOML inline tables cannot span lines
        tmp_path,
    )
    stream = f"HUNG_{unique}"
    js = nc.jetstream()
    async with Bus(config) as bus:
        for n in range(STUCK):
            await js.publish(f"hung{unique}.in.blocking", orjson.dumps({"n": n}))
            await js.publish(f"hung{unique}.in.hanging", orjson.dumps({"n": n}))
        with anyio.fail_after(30):
            await anyio.to_thread.run_sync(_blocked.wait, 30)  # a call is stuck in its thread
        for n in range(FLOWING):
            await js.publish(f"hung{unique}.in.flow", orjson.dumps({"n": n}))
        # All of this happens while the first blocking calls are still stuck.
        await wait_settled(nc, stream, f"busway-route-flow{unique}")
        await wait_settled(nc, stream, f"busway-route-hanging{unique}")
        await wait_settled(nc, stream, f"busway-route-blocking{unique}")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{bus.http_port}") as http:
            health = await http.get("/healthz")
        stuck_meanwhile = _inside
        _gate.set()  # the stuck threads return now; their results must go nowhere

        async def threads_returned() -> bool:
            return _inside == 0

        await eventually(threads_returned)
        stats = {s.name: s for s in bus.metrics.stats}
        timeouts = {
            name: s.errors.get("timeout", 0) for name, s in stats.items() if "flow" not in name
        }
        dead = sum(s.dead_lettered for s in stats.values())
        in_flight = sum(s.in_flight for s in stats.values())

    delivered = [
        f"{m.subject.rpartition('.')[2]}{orjson.loads(m.data)['n']}"
        for m in await read_stream(nats_server.url, f"HUNGOUT_{unique}")
    ]
    expected = [f"{route}{n}" for route in ("blocking", "hanging") for n in range(STUCK)]
    expected += [f"flow{n}" for n in range(FLOWING)]
    Figures.of(
        "hung-stage",
        expected,
        delivered,
        stuck_while_flowing=stuck_meanwhile,
        timeouts=timeouts,
        dead_lettered=dead,
    ).report()

    assert stuck_meanwhile == STUCK  # all of the above happened while the calls were stuck
    assert health.status_code == 200
    # Each exactly once: the retries went through, the stuck threads' late results went nowhere.
    assert sorted(delivered) == sorted(expected)
    assert timeouts == {f"blocking{unique}": STUCK, f"hanging{unique}": STUCK}
    assert dead == 0
    assert in_flight == 0
