"""The `mqtt` source and sink: QoS 1 to and from an existing MQTT broker (aiomqtt).

    _config   every config key; importable without aiomqtt (`busway schema`, `busway check`)
    _topics   MQTT topic <-> NATS subject, by nats-server's own rules
    _client   the only module that imports aiomqtt / paho-mqtt; their errors made ours
    source    subscribe (persistent session), publish to JetStream, PUBACK after the PubAck
    sink      publish with QoS 1; the JetStream ack waits for the broker's PUBACK

The source and sink modules (and so aiomqtt) are imported only when a component is built:
a config without MQTT never loads the client, and a missing `busway[mqtt]` extra fails
`busway check` with the `pip install` to run.
"""

from __future__ import annotations

import importlib
from typing import Any

from busway import Adapter, BuildContext, ConfigError, Sink, Source
from busway.adapters.mqtt._config import MqttSinkConfig, MqttSourceConfig

__all__ = ["adapter"]


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"busway.adapters.mqtt.{name}")
    except ImportError as exc:
        raise ConfigError(str(exc)) from None


def _create_source(config: MqttSourceConfig, context: BuildContext) -> Source:
    source: Source = _module("source").MqttSource(_resolved(config, context))
    return source


def _create_sink(config: MqttSinkConfig, context: BuildContext) -> Sink:
    sink: Sink = _module("sink").MqttSink(_resolved(config, context))
    return sink


def _resolved(config: Any, context: BuildContext) -> Any:
    """`config` with its certificate paths made absolute against the config file."""
    connection = config.connection
    paths = {
        key: str(context.resolve_path(value))
        for key in ("ca_file", "cert_file", "key_file")
        if (value := getattr(connection, key)) is not None
    }
    if not paths:
        return config
    import msgspec

    return msgspec.structs.replace(config, connection=msgspec.structs.replace(connection, **paths))


adapter: Adapter[MqttSourceConfig, MqttSinkConfig] = Adapter(
    type="mqtt",
    source_config=MqttSourceConfig,
    create_source=_create_source,
    sink_config=MqttSinkConfig,
    create_sink=_create_sink,
)
"""MQTT 3.1.1 / 5 brokers (aiomqtt, `pip install 'busway[mqtt]'`)."""
