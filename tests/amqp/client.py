"""The test's own side of RabbitMQ: declare queues and exchanges, publish, read a queue back.

Plain aio-pika, so the tests check the adapters against what a RabbitMQ application sees.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection


@dataclass(frozen=True)
class Got:
    """One message read from a queue."""

    body: bytes
    message_id: str | None
    headers: dict[str, Any]
    routing_key: str
    delivery_mode: int | None
    content_type: str | None


class Rabbit:
    """A connection of the test's own, with helpers."""

    def __init__(self, connection: AbstractConnection, channel: AbstractChannel) -> None:
        self.connection = connection
        self.channel = channel

    async def queue(self, name: str | None = None, **arguments: Any) -> str:
        """Declare a durable queue (a unique name if none) and return its name."""
        name = name or f"q-{uuid.uuid4().hex[:8]}"
        await self.channel.declare_queue(name, durable=True, arguments=arguments or None)
        return name

    async def exchange(self, name: str | None = None, *, bind: dict[str, str] | None = None) -> str:
        """Declare a durable topic exchange; `bind` maps queue names to binding keys."""
        name = name or f"x-{uuid.uuid4().hex[:8]}"
        exchange = await self.channel.declare_exchange(
            name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        for queue, key in (bind or {}).items():
            declared = await self.channel.declare_queue(queue, durable=True)
            await declared.bind(exchange, key)
        return name

    async def publish(
        self,
        queue: str,
        body: bytes,
        *,
        message_id: str | None = None,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
    ) -> None:
        """Publish persistently to `queue` through the default exchange, confirmed."""
        await self.channel.default_exchange.publish(
            aio_pika.Message(
                body,
                message_id=message_id,
                content_type=content_type,
                content_encoding=content_encoding,
                headers=headers,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=queue,
        )

    async def drain(self, queue: str) -> list[Got]:
        """Take every message `queue` holds now (acked: they are gone afterwards)."""
        declared = await self.channel.get_queue(queue)
        found: list[Got] = []
        while (message := await declared.get(fail=False)) is not None:
            await message.ack()
            found.append(
                Got(
                    body=message.body,
                    message_id=message.message_id,
                    headers=dict(message.headers or {}),
                    routing_key=message.routing_key or "",
                    delivery_mode=int(message.delivery_mode) if message.delivery_mode else None,
                    content_type=message.content_type,
                )
            )
        return found

    async def depth(self, queue: str) -> tuple[int, int]:
        """(ready, consumers) of `queue`, from a passive declare."""
        declared = await self.channel.declare_queue(queue, passive=True)
        result = declared.declaration_result
        return int(result.message_count or 0), int(result.consumer_count or 0)


@asynccontextmanager
async def rabbit(url: str) -> AsyncIterator[Rabbit]:
    """A connection and a confirming channel to `url`, closed afterwards."""
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        yield Rabbit(connection, channel)
    finally:
        await connection.close()
