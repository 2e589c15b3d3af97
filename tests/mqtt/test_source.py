"""The `mqtt` source against a real Mosquitto: QoS 1 in, JetStream out, PUBACK after PubAck."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import StartupError
from busway.testing import Harness, eventually, start_bus
from tests.mqtt.broker import MosquittoBroker
from tests.mqtt.conftest import require_mosquitto
from tests.support import free_port

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _config(url: str, *, topics: str = '["devices/#"]', extra: str = "") -> str:
    return f"""
[[streams]]
name = "IOT"
subjects = ["iot.>"]

[[sources]]
name = "devices"
type = "mqtt"
subject = "iot.{{topic}}"
topics = {topics}
lease_ttl = "1s"
{extra}
connection = {{ url = "{url}" }}
"""


@asynccontextmanager
async def _device(broker: MosquittoBroker, **kwargs: object) -> AsyncIterator[aiomqtt.Client]:
    async with aiomqtt.Client("127.0.0.1", broker.port, **kwargs) as client:  # type: ignore[arg-type]
        yield client


async def _publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    async with _device(broker) as device:
        for topic, payload in messages:
            await device.publish(topic, payload, qos=1)


async def _stored(harness: Harness) -> list[tuple[str, bytes]]:
    return [(m.subject, m.data) for m in await harness.stored("IOT")]


async def test_qos1_messages_land_once_each_on_the_topic_subject(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    sent = [(f"devices/d{i}/temp", orjson.dumps({"n": i})) for i in range(20)]
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        await _publish(mosquitto, sent)
        await eventually(lambda: harness.stats("devices").published == len(sent), timeout=20)
        stored = await harness.stored("IOT")
    assert [(m.subject, m.data) for m in stored] == [
        (f"iot.devices.d{i}.temp", payload) for i, (_, payload) in enumerate(sent)
    ]
    assert [m.headers["Mqtt-Topic"] for m in stored] == [topic for topic, _ in sent]
    assert len({m.id for m in stored}) == len(sent)
    assert all(m.id.startswith("devices:") for m in stored)


async def test_messages_sent_while_busway_is_down_arrive_when_it_starts(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """The persistent session: the broker queues QoS 1 messages for busway while it is away."""
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
    sent = [(f"devices/d{i}", b"reading %d" % i) for i in range(30)]
    await _publish(mosquitto, sent)
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").published == len(sent), timeout=30)
        stored = await _stored(harness)
    assert sorted(data for _, data in stored) == sorted(payload for _, payload in sent)


async def test_nothing_is_acknowledged_to_the_broker_before_jetstream_stored_it(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """While the stream is gone every publish fails: the source acknowledges nothing, so the
    broker keeps the messages and sends them again once the stream is back."""
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        nc = NatsClient()
        await nc.connect(harness.nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info("IOT")
            await js.delete_stream("IOT")
            sent = [(f"devices/d{i}", b"while gone %d" % i) for i in range(10)]
            await _publish(mosquitto, sent)
            await eventually(lambda: harness.stats("devices").errors.get("publish", 0) >= 1)
            assert harness.stats("devices").published == 0
            await js.add_stream(info.config)
            await eventually(lambda: harness.stats("devices").published >= len(sent), timeout=30)
            stored = await _stored(harness)
        finally:
            await nc.close()
    assert sorted(data for _, data in stored) == sorted(payload for _, payload in sent)


async def test_a_broker_restart_mid_flow_loses_nothing_and_stores_nothing_twice(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    first = [(f"devices/a{i}", b"before %d" % i) for i in range(50)]
    second = [(f"devices/b{i}", b"after %d" % i) for i in range(50)]
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        await _publish(mosquitto, first)
        mosquitto.restart()  # SIGTERM: it saves the session and what it still queues
        await _publish(mosquitto, second)
        await eventually(lambda: harness.stats("devices").errors.get("broker", 0) >= 1)

        async def all_stored() -> bool:
            return len(await harness.stored("IOT")) >= len(first) + len(second)

        await eventually(all_stored, timeout=40)
        stored = await _stored(harness)
    assert sorted(data for _, data in stored) == sorted(p for _, p in first + second)


async def test_a_payload_that_is_not_json_is_dead_lettered_with_its_reason_and_acknowledged(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    config = _config(mosquitto.url, extra='payload = "json"')
    async with start_bus(config, directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        await _publish(mosquitto, [("devices/x", b"{not json"), ("devices/y", b'{"ok": 1}')])
        await eventually(lambda: harness.stats("devices").published == 1, timeout=20)
        await eventually(lambda: harness.stats("devices").dead_lettered == 1)
        [dead] = await harness.stored("BUSWAY_DEADLETTER")
        stored = await _stored(harness)
    assert stored == [("iot.devices.y", b'{"ok": 1}')]
    assert dead.data == b"{not json"
    assert dead.headers["Busway-Error-Reason"] == "malformed"
    assert "devices/x" in dead.headers["Busway-Origin"]
    assert harness.stats("devices").errors["malformed"] == 1


async def test_a_topic_with_no_subject_is_dead_lettered(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    async with start_bus(_config(mosquitto.url), directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        await _publish(mosquitto, [("devices/with space", b"1"), ("devices/ok", b"2")])
        await eventually(lambda: harness.stats("devices").dead_lettered == 1, timeout=20)
        await eventually(lambda: harness.stats("devices").published == 1)
        [dead] = await harness.stored("BUSWAY_DEADLETTER")
    assert dead.headers["Busway-Error-Reason"] == "topic"


async def test_a_refused_login_fails_the_start_without_the_password(
    mosquitto_auth: MosquittoBroker, tmp_path: Path
) -> None:
    config = _config(mosquitto_auth.url).replace(
        f'url = "{mosquitto_auth.url}"',
        f'url = "{mosquitto_auth.url}", username = "device", password = "wrong-pw-123"',
    )
    with pytest.raises(StartupError) as caught:
        async with start_bus(config, directory=tmp_path):
            pass
    message = str(caught.value)
    assert "refused the login of user 'device'" in message
    assert "wrong-pw-123" not in message
    assert "\n" not in message.strip()


async def test_the_right_password_logs_in(mosquitto_auth: MosquittoBroker, tmp_path: Path) -> None:
    config = _config(mosquitto_auth.url).replace(
        f'url = "{mosquitto_auth.url}"',
        f'url = "{mosquitto_auth.url}", username = "device", password = "s3cret-pw"',
    )
    async with start_bus(config, directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        async with _device(mosquitto_auth, username="device", password="s3cret-pw") as device:
            await device.publish("devices/z", b"in", qos=1)
        await eventually(lambda: harness.stats("devices").published == 1, timeout=20)


async def test_an_unreachable_broker_fails_the_start_in_one_line(tmp_path: Path) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    with pytest.raises(StartupError) as caught:
        async with start_bus(_config(url), directory=tmp_path):
            pass
    message = str(caught.value)
    assert message.startswith(f"source 'devices': cannot connect to MQTT broker {url}")
    assert "\n" not in message


async def test_wait_for_broker_starts_anyway_and_connects_when_the_broker_comes(
    tmp_path: Path,
) -> None:
    require_mosquitto()
    broker = MosquittoBroker()
    broker.stop()
    try:
        config = _config(broker.url).replace(
            f'url = "{broker.url}"', f'url = "{broker.url}", wait_for_broker = true'
        )
        async with start_bus(config, directory=tmp_path) as harness:
            await eventually(lambda: harness.stats("devices").errors.get("broker", 0) >= 1)
            assert not harness.stats("devices").ready
            broker.start()
            await eventually(lambda: harness.stats("devices").ready, timeout=30)
            await _publish(broker, [("devices/late", b"late")])
            await eventually(lambda: harness.stats("devices").published == 1, timeout=20)
    finally:
        broker.close()


async def test_mqtt5_ids_come_from_the_publishers_property(
    mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    """Same payload, different `message-id`: two messages; same `message-id`: one."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    config = _config(mosquitto.url, extra='id_property = "message-id"').replace(
        f'url = "{mosquitto.url}"', f'url = "{mosquitto.url}", protocol = "5"'
    )
    async with start_bus(config, directory=tmp_path) as harness:
        await eventually(lambda: harness.stats("devices").ready, timeout=20)
        async with _device(mosquitto, protocol=aiomqtt.ProtocolVersion.V5) as device:
            for message_id in ("m-1", "m-2", "m-2"):
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.UserProperty = [("message-id", message_id)]
                await device.publish("devices/d", b"same", qos=1, properties=properties)
        await eventually(lambda: harness.stats("devices").published == 3, timeout=20)
        stored = await harness.stored("IOT")
    assert [m.data for m in stored] == [b"same", b"same"]
    assert len({m.id for m in stored}) == 2
