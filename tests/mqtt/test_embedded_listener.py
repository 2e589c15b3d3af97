"""`[nats] mqtt_listen`: devices talk MQTT to the embedded nats-server itself (no broker).

A real MQTT client (aiomqtt) publishes with QoS 1 into a topic a stream captures, and
subscribes to a route's output; the login, when configured, is enforced for MQTT clients.
"""

from __future__ import annotations

from pathlib import Path

import aiomqtt
import anyio
import orjson
import pytest

from busway import ConfigError
from busway.testing import eventually, start_bus
from tests.support import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(port: int, *, login: str = "") -> str:
    return f"""
[nats]
mqtt_listen = "127.0.0.1:{port}"
{login}

[[streams]]
name = "TELEMETRY"
subjects = ["telemetry.>"]

[[streams]]
name = "COMMANDS"
subjects = ["commands.>"]

[[routes]]
name = "alarms"
from = "telemetry.>"
to = ["commands.alarm"]
"""


async def test_a_qos1_publish_lands_once_in_the_stream_and_a_device_gets_a_routes_output(
    tmp_path: Path,
) -> None:
    port = free_port()
    async with (
        start_bus(_config(port), directory=tmp_path) as harness,
        aiomqtt.Client("127.0.0.1", port, identifier="listener") as listener,
        aiomqtt.Client("127.0.0.1", port, identifier="sensor-1") as sensor,
    ):
        await listener.subscribe("commands/#", qos=1)
        for i in range(5):
            await sensor.publish("telemetry/plant.1/temp", orjson.dumps({"n": i}), qos=1)

        async def all_stored() -> bool:
            return len(await harness.stored("TELEMETRY")) >= 5

        await eventually(all_stored)
        stored = await harness.stored("TELEMETRY")
        got = []
        with anyio.move_on_after(20):  # a missing output fails the assertion below, not a hang
            async for message in listener.messages:
                got.append((message.topic.value, message.payload))
                if len(got) == 5:
                    break
    # Every message is there, once, in order, on the subject its topic maps to.
    assert [(m.subject, orjson.loads(m.data)["n"]) for m in stored] == [
        ("telemetry.plant//1.temp", i) for i in range(5)
    ]
    # nats-server marks what MQTT clients publish (`Nmqtt-Pub`); a route's output must not
    # inherit the marker, or the server never hands it to MQTT subscribers.
    assert got == [("commands/alarm", orjson.dumps({"n": i})) for i in range(5)]


async def test_the_mqtt_login_is_required_when_configured(tmp_path: Path) -> None:
    port = free_port()
    login = 'mqtt_user = "device"\nmqtt_password = "pw-9876"'
    async with start_bus(_config(port, login=login), directory=tmp_path) as harness:
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port, username="device", password="nope"):
                pass
        with pytest.raises(aiomqtt.MqttError):
            async with aiomqtt.Client("127.0.0.1", port):
                pass
        async with aiomqtt.Client("127.0.0.1", port, username="device", password="pw-9876") as c:
            await c.publish("telemetry/x", b"1", qos=1)

        async def stored() -> bool:
            return len(await harness.stored("TELEMETRY")) == 1

        await eventually(stored)
    config = (tmp_path / "nats" / "nats-server.conf").stat()
    assert config.st_mode & 0o077 == 0, "the server config holds the password: owner only"


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        ('mqtt_listen = "0.0.0.0:1883"', "set mqtt_user and mqtt_password"),
        ('mqtt_listen = "127.0.0.1:0"', "needs a fixed port"),
        ('mqtt_user = "a"\nmqtt_password = "b"', "need mqtt_listen"),
        ('mqtt_listen = "{mqtt}"\nmqtt_user = "a"', "both mqtt_user and mqtt_password"),
        ('mqtt_listen = "{mqtt}"\nmqtt_user = "a"\nmqtt_password = "x\\"y"', "quotes"),
        ('servers = ["nats://{nats}"]\nmqtt_listen = "{mqtt}"', "own nats-server"),
    ],
)
async def test_unsafe_or_incomplete_mqtt_keys_are_refused(
    keys: str, error: str, tmp_path: Path
) -> None:
    keys = keys.replace("{mqtt}", f"127.0.0.1:{free_port()}")
    keys = keys.replace("{nats}", f"127.0.0.1:{free_port()}")
    with pytest.raises(ConfigError, match=error):
        async with start_bus(f"[nats]\n{keys}\n", directory=tmp_path):
            pass
