"""The `mqtt` source against a real Mosquitto: QoS 1 in, JetStream out, PUBACK after PubAck."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiomqtt
import anyio
import orjson
import pytest

from busway import StartupError
from busway.testing import Harness, eventually, start_bus
from tests.mqtt.broker import MosquittoBroker

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
