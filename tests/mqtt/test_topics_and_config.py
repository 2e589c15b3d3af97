"""Topic <-> subject mapping (nats-server's rules), the adapter's config checks, and the one
private attribute of aiomqtt the adapter relies on."""

from __future__ import annotations

import asyncio

import aiomqtt
import pytest

from busway import ConfigError
from busway.adapters.mqtt._topics import subject_to_topic, topic_to_subject
from busway.testing.conformance._common import config_text, decode, registry_for

PAIRS = [
    ("sensors/cold-1/temp", "sensors.cold-1.temp"),
    ("/sensors/temp", "/.sensors.temp"),
    ("sensors/temp/", "sensors.temp./"),
    ("sensors//temp", "sensors./.temp"),
    ("//sensors/temp", "/./.sensors.temp"),
    ("spBv1.0/plant1", "spBv1//0.plant1"),
    ("a", "a"),
]


@pytest.mark.parametrize(("topic", "subject"), PAIRS)
def test_a_topic_maps_to_the_subject_nats_server_gives_it_and_back(
    topic: str, subject: str
) -> None:
    assert topic_to_subject(topic) == subject
    assert subject_to_topic(subject) == topic


@pytest.mark.parametrize("topic", ["with space", "tab\there", "a/*/b", "a/>", ""])
def test_a_topic_with_no_subject_is_refused(topic: str) -> None:
    with pytest.raises(ValueError, match=r"topic|empty"):
        topic_to_subject(topic)


def _decode(role: str, table: str) -> None:
    registry = registry_for(None)
    decode(config_text(role=role, type_name="mqtt", table=table), registry, ".")


@pytest.mark.parametrize(
    ("role", "table", "error"),
    [
        ("source", 'topics = []\nconnection = { url = "mqtt://h" }', "topics is empty"),
        ("source", 'topics = ["a/#/b"]\nconnection = { url = "mqtt://h" }', "whole, last"),
        ("source", 'topics = ["a+"]\nconnection = { url = "mqtt://h" }', "whole level"),
        ("source", 'topics = ["a"]\nconnection = { url = "http://h" }', "mqtt://host"),
        (
            "source",
            'topics = ["a"]\nconnection = { url = "mqtt://u:p@h" }',
            "credentials in `username`",
        ),
        (
            "source",
            'topics = ["a"]\nid_property = "x"\nconnection = { url = "mqtt://h" }',
            "needs MQTT 5",
        ),
        ("sink", 'topic = "a/#"\nconnection = { url = "mqtt://h" }', "no \\+ or #"),
        ("sink", 'topic = "{other}"\nconnection = { url = "mqtt://h" }', "placeholder"),
        ("sink", 'connection = { url = "mqtt://h", ca_file = "ca.pem" }', "mqtts://"),
    ],
)
def test_bad_mqtt_keys_are_refused_by_name(role: str, table: str, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        _decode(role, table)


def test_the_paho_client_under_aiomqtt_is_where_the_adapter_reaches_it() -> None:
    """adapters/mqtt/_client.py reaches paho through `aiomqtt.Client._client` for manual
    acks and PUBACK reason codes, and fails a broken write into `aiomqtt.Client._disconnected`:
    an aiomqtt release that renames either must fail here."""

    async def inner() -> tuple[object, object]:
        client = aiomqtt.Client("127.0.0.1", 1)
        return client._client, client._disconnected

    paho, disconnected = asyncio.run(inner())
    assert isinstance(disconnected, asyncio.Future)
    assert callable(paho.manual_ack_set)  # type: ignore[attr-defined]
    assert callable(paho.ack)  # type: ignore[attr-defined]
    assert callable(paho.publish)  # type: ignore[attr-defined]
