"""The `mqtt` sink against a real Mosquitto: QoS 1 out, the JetStream ack after the PUBACK."""

from __future__ import annotations

import gc
from pathlib import Path

import orjson
import pytest

from busway import StartupError
from busway.testing import eventually, start_bus
from tests.mqtt.broker import MosquittoBroker, Subscriber

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(url: str, *, extra: str = "", connection: str = "") -> str:
    return f"""
[[streams]]
name = "OUT"
subjects = ["out.>"]

[[sinks]]
name = "devices"
type = "mqtt"
from = "out.>"
topic = "cmd/{{subject}}"
batch_wait = "1ms"
retry = {{ backoff = "100ms", max_backoff = "500ms", max_attempts = 1000 }}
circuit = {{ failures = 0 }}
{extra}
connection = {{ url = "{url}"{connection} }}
"""


async def test_a_routes_output_reaches_an_mqtt_subscriber_on_the_mapped_topic(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    subscriber = Subscriber(mosquitto, ["cmd/#"], client_id="listener")
    await subscriber.subscribe()
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        for i in range(10):
            await harness.publish(f"out.valve.v{i}", {"open": i}, id=f"m{i}")
        await eventually(lambda: harness.stats("devices").published == 10, timeout=20)
    received = await subscriber.drain()
    assert sorted(received) == sorted(
        (f"cmd/out/valve/v{i}", orjson.dumps({"open": i})) for i in range(10)
    )


async def test_a_broker_outage_mid_flow_delays_delivery_and_loses_nothing(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    subscriber = Subscriber(mosquitto, ["cmd/#"], client_id="listener")
    await subscriber.subscribe()
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        for i in range(20):
            await harness.publish(f"out.a{i}", b"before %d" % i, id=f"a{i}")
        await eventually(lambda: harness.stats("devices").published == 20, timeout=20)
        mosquitto.stop()
        for i in range(20):
            await harness.publish(f"out.b{i}", b"during %d" % i, id=f"b{i}")
        await eventually(lambda: harness.stats("devices").retried >= 1, timeout=20)
        assert harness.stats("devices").published == 20  # nothing counted delivered while down
        mosquitto.start()
        await eventually(lambda: harness.stats("devices").published >= 40, timeout=40)
    received = await subscriber.drain()
    payloads = {payload for _, payload in received}
    wanted = {b"before %d" % i for i in range(20)} | {b"during %d" % i for i in range(20)}
    assert payloads == wanted  # each at least once (QoS 1); none missing


async def test_a_refused_login_fails_the_start_without_the_password(
    mosquitto_auth: MosquittoBroker, tmp_path: Path
) -> None:
    config = _config(
        mosquitto_auth.url, connection=', username = "device", password = "not-it-456"'
    )
    message = ""
    try:
        async with start_bus(config, directory=tmp_path):
            pass
    except StartupError as exc:
        message = str(exc)
    assert "refused the login of user 'device'" in message
    assert "not-it-456" not in message
    # The engine's sink queue must be closed although the sink never opened: it leaked, and
    # its ResourceWarning failed whichever test ran when it was collected.
    gc.collect()


async def test_a_message_over_max_payload_is_dead_lettered_not_retried(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with start_bus(
        _config(mosquitto.url, extra="max_payload = 16"), directory=tmp_path
    ) as harness:
        await harness.publish("out.big", b"x" * 17, id="big")
        await harness.publish("out.small", b"ok", id="small")
        await eventually(lambda: harness.stats("devices").dead_lettered == 1, timeout=20)
        await eventually(lambda: harness.stats("devices").published == 1, timeout=20)
        [dead] = await harness.stored("BUSWAY_DEADLETTER")
    assert dead.data == b"x" * 17
    assert "max_payload" in dead.headers["Busway-Error"]
