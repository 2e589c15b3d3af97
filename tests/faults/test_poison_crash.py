"""A poison message that kills the daemon (`os._exit(1)`) among 200 innocent ones in flight.

All 201 messages are in the stream before the daemon (`busway run`, against a nats-server the
test owns) starts, and `max_in_flight` lets it take them all at once, so the first crash
happens with every one of them delivered and un-acked. A supervisor loop restarts the daemon
after each crash, as systemd would. Every crash redelivers what the dead process held, with
JetStream's delivery count raised; busway must still find the culprit and spare the rest:

* the poison is dead-lettered with reason `crashed` once it has crashed the process
  `max_attempts` times while processed alone (one crash more in all: the first one, beside the
  others, blames nobody);
* every innocent message arrives downstream exactly once, and none is dead-lettered;
* nothing is both delivered and dead-lettered.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from nats.aio.msg import Msg

from tests.configs import config_toml, stream_table
from tests.faults import crash_sink
from tests.faults.helpers import Figures, consumer_settled, read_stream
from tests.support import REPO, Daemon, NatsServer, eventually, free_port

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(300)]

INNOCENT = 200
POISON = 100  # in the middle: half the innocents come before it, half after
# Innocents whose first attempt ever fails (a transient error, retried): 150 comes after the
# poison, so it first runs with a delivery count already past max_attempts.
FLAKY = {40, 150}
MAX_ATTEMPTS = 3
MAX_CRASHES = MAX_ATTEMPTS + 3  # the supervisor gives up past this: a crash loop


def price(body: dict[str, Any]) -> dict[str, Any]:
    """The route's Python stage: kills the process on the poison order."""
    if body["id"] == POISON:
        os._exit(1)  # what a segfaulting driver does to the daemon
    if body["id"] in FLAKY:
        failed_once = Path(os.environ["BUSWAY_TEST_FLAKY_DIR"]) / str(body["id"])
        if not failed_once.exists():  # across processes: the daemon restarts in between
            failed_once.touch()
            raise ConnectionError(f"pricing service busy for order {body['id']}")
    return {"id": body["id"], "price": body["id"] * 2}


def daemon_config(nats_url: str, component: str, *, http: bool = True) -> str:
    """`http = False` leaves the listener off, so several daemons can share the config."""
    listen = f"127.0.0.1:{free_port()}" if http else ""
    return config_toml(
        nats_url,
        top='shutdown_timeout = "5s"',
        http=listen,
        streams=[stream_table("CRASH_IN", "crashin.>"), stream_table("CRASH_OUT", "crashout.>")],
        body=component,
    )


ROUTE = f"""
[[routes]]
name = "price"
from = "crashin.orders"
to = ["crashout.orders"]
max_in_flight = 512
ack_wait = "2s"
retry = {{ max_attempts = {MAX_ATTEMPTS}, backoff = "50ms", max_backoff = "200ms" }}
stages = [{{ python = "tests.faults.test_poison_crash:price" }}]
"""

SINK = f"""
[[sinks]]
name = "ledger"
type = "crash-test"
from = "crashin.orders"
path = "out/orders.jsonl"
poison = {POISON}
batch_size = 64
max_in_flight = 512
ack_wait = "2s"
retry = {{ max_attempts = {MAX_ATTEMPTS}, backoff = "50ms", max_backoff = "200ms" }}
"""


async def publish_orders(url: str) -> None:
    """Store every order before the daemon starts (it declares the same streams again)."""
    client = await nats.connect(url)
    try:
        js = client.jetstream()
        await js.add_stream(name="CRASH_IN", subjects=["crashin.>"])
        await js.add_stream(name="CRASH_OUT", subjects=["crashout.>"])
        for n in range(INNOCENT + 1):
            await js.publish("crashin.orders", orjson.dumps({"id": n}))
    finally:
        await client.close()


async def supervise(daemon: Daemon, url: str, durable: str) -> int:
    """Run the daemon, restarting it after each crash, until its consumer has settled every
    message; the number of crashes."""
    return await supervise_all([daemon], url, durable)


async def supervise_all(
    daemons: list[Daemon], url: str, durable: str, *, max_crashes: int = MAX_CRASHES
) -> int:
    """Run every daemon, restarting each one after it crashes (as systemd would), until their
    shared consumer has settled every message with all of them running; the crashes in all."""
    crashes = 0
    for daemon in daemons:
        daemon.start()

    def exited() -> list[Daemon]:
        return [d for d in daemons if d.process is not None and d.process.poll() is not None]

    async def crashed_or_settled() -> bool:
        return bool(exited()) or await consumer_settled(url, "CRASH_IN", durable)

    while True:
        await eventually(crashed_or_settled, timeout=120)
        dead = exited()
        if not dead:
            # A daemon restarted a moment ago may still be importing: SIGTERM before its
            # handler is installed ends it by the signal. Stop only daemons that are up.
            for daemon in daemons:
                await daemon.ready()
            return crashes
        for daemon in dead:
            assert daemon.process is not None
            assert daemon.process.returncode == 1, daemon.output()
            crashes += 1
            assert crashes <= max_crashes, f"still crashing after {crashes} restarts"
            daemon.start()


def dead_letters_of(messages: list[Msg], component: str) -> list[Msg]:
    return [m for m in messages if m.subject == f"busway.deadletter.{component}"]


def assert_poison_dead_lettered_alone(dead: list[Msg]) -> None:
    ids = [orjson.loads(m.data)["id"] for m in dead]
    assert ids == [POISON], f"dead-lettered: {sorted(ids)}"  # no innocent among them
    headers = dead[0].headers or {}
    assert headers["Busway-Error-Reason"] == "crashed"
    assert f"crashed the process {MAX_ATTEMPTS} time(s)" in headers["Busway-Error"]
    assert headers["Busway-Attempts"] == str(MAX_ATTEMPTS)


async def test_a_crashing_route_stage_is_dead_lettered_and_spares_the_messages_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the daemon imports this module's stage
    monkeypatch.setenv("BUSWAY_TEST_FLAKY_DIR", str(tmp_path))
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store)
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url, ROUTE))
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    try:
        await publish_orders(server.url)
        crashes = await supervise(daemon, server.url, "busway-route-price")
        assert await daemon.stop() == 0
        outputs = await read_stream(server.url, "CRASH_OUT")
        dead = dead_letters_of(await read_stream(server.url, "BUSWAY_DEADLETTER"), "price")
    finally:
        daemon.kill()
        server.stop()

    delivered = [orjson.loads(m.data)["id"] for m in outputs]
    figures = Figures.of(
        "poison-crash:route",
        [n for n in range(INNOCENT + 1) if n != POISON],
        delivered,
        crashes=crashes,
        dead_lettered=len(dead),
    ).report()
    assert (figures.delivered, figures.lost, figures.duplicated) == (INNOCENT, 0, 0), figures
    assert POISON not in delivered  # nothing both delivered and dead-lettered
    assert_poison_dead_lettered_alone(dead)
    assert crashes == MAX_ATTEMPTS + 1
    assert all((tmp_path / str(n)).exists() for n in FLAKY)  # each failed once, then got through


async def test_a_crashing_sink_write_is_dead_lettered_and_spares_the_messages_beside_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plugins = tmp_path / "plugins"
    crash_sink.register(plugins)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(plugins), str(REPO)]))
    store = tmp_path / "nats"
    store.mkdir()
    (tmp_path / "out").mkdir()
    server = NatsServer(store)
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url, SINK))
    daemon = Daemon(config, log=tmp_path / "daemon.log")
    try:
        await publish_orders(server.url)
        crashes = await supervise(daemon, server.url, "busway-sink-ledger")
        assert await daemon.stop() == 0
        dead = dead_letters_of(await read_stream(server.url, "BUSWAY_DEADLETTER"), "ledger")
    finally:
        daemon.kill()
        server.stop()

    lines = [orjson.loads(line) for line in (tmp_path / "out/orders.jsonl").read_bytes().split()]
    figures = Figures.of(
        "poison-crash:sink",
        [n for n in range(INNOCENT + 1) if n != POISON],
        [line["id"] for line in lines],
        crashes=crashes,
        dead_lettered=len(dead),
    ).report()
    assert (figures.delivered, figures.lost, figures.duplicated) == (INNOCENT, 0, 0), figures
    assert_poison_dead_lettered_alone(dead)
    assert crashes == MAX_ATTEMPTS + 1
    # Redeliveries after a crash are suspects: each one was written in a batch of its own.
    redelivered = [line for line in lines if line["delivery"] > 1]
    assert redelivered, "the first crash left nothing to redeliver"
    assert {line["batch"] for line in redelivered} == {1}
