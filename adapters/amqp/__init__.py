"""RabbitMQ (AMQP 0-9-1) source and sink on aio-pika (`pip install 'busway[amqp]'`).

    _config    every config key; importable without aio-pika (`busway schema`, `busway check`)
    _client    the only import of aio-pika: connecting, publishing with confirms, its errors
               translated into busway's
    _inbound   a delivery's message id, headers and well-formedness (pure)
    source     consume a queue, publish into JetStream, ack after the PubAck
    sink       publish with confirms and `mandatory`, ack in JetStream after the confirm

The adapter below is what the `amqp` entry point names; its factories import the client
modules only when a component is built, so a config without AMQP never loads aio-pika and a
component whose extra is missing fails `busway check` with the `pip install` to run.
"""

from __future__ import annotations

import importlib
from typing import Any

from busway import Adapter, BuildContext, ConfigError, Sink, Source
from busway.adapters.amqp._config import AmqpSinkConfig, AmqpSourceConfig

__all__ = ["AmqpSinkConfig", "AmqpSourceConfig", "adapter"]


def _module(name: str) -> Any:
    try:
        return importlib.import_module(f"busway.adapters.amqp.{name}")
    except ImportError as exc:
        raise ConfigError(str(exc)) from None


def _create_source(config: AmqpSourceConfig, context: BuildContext) -> Source:
    source: Source = _module("source").create_source(config, context)
    return source


def _create_sink(config: AmqpSinkConfig, context: BuildContext) -> Sink:
    sink: Sink = _module("sink").create_sink(config, context)
    return sink


adapter: Adapter[AmqpSourceConfig, AmqpSinkConfig] = Adapter(
    type="amqp",
    source_config=AmqpSourceConfig,
    create_source=_create_source,
    sink_config=AmqpSinkConfig,
    create_sink=_create_sink,
)
"""The `amqp` adapter: a queue consumer source and a confirming publisher sink."""
