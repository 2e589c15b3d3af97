"""nats-py's types under busway's names, for annotations outside `busway._nats`.

Code outside this package holds a connection (`NatsClient`) or a JetStream context
(`JetStream`) to hand it to functions of this package (reading a public property such as
`is_connected` at most), and catches busway's errors only (see `busway._nats.errors`).
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
