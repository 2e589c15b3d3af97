"""nats-py's types under busway's names, for annotations outside `busway._nats`.

Code outside this package holds a connection (`NatsClient`) or a JetStream context
(`JetStream`) only to hand it back to functions of this package; it never calls nats-py on
them itself, and it catches busway's errors only (see `busway._nats.errors`).
"""

from __future__ import annotations

import asyncio
from typing import TypeAlias

from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.kv import KeyValue

__all__ = ["JetStream", "KeyValue", "NatsClient", "PubAck", "PubAckFuture"]

NatsClient: TypeAlias = Client
JetStream: TypeAlias = JetStreamContext
PubAckFuture: TypeAlias = "asyncio.Future[PubAck]"
