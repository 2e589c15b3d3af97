"""A `Delivery`: one message taken from a durable consumer, carrying its own ack.

As in Redpanda Connect, the ack travels with the delivery, never inside the message: whoever
holds a `Delivery` settles it with `ack()`, `nak(delay)` or `term()` (or asks for more time
with `in_progress()`), and the record makes sure that happens once. The continuous pull
(`busway._nats.pull`) builds one per message from nats-py's `Msg`; route and sink workers,
the aggregator and crash isolation take `Delivery` values, never nats-py's type.

Settling goes through the record's owner (the consumer component): it frees the pull's slot,
tells crash isolation, and sends the ack payload. A second settle of the same delivery sends
nothing and frees nothing: it is counted (`settled_twice`) and logged as the bug it is.

    async def handle(delivery: Delivery) -> None:
        try:
            await write(delivery.data)
        except RetryableError:
            await delivery.nak(delay=2.0)   # redelivered in 2 s
        else:
            await delivery.ack()
"""

from __future__ import annotations

from typing import Protocol

from busway._delivery.contract import ACK, TERM, nak_payload

__all__ = ["Delivery", "Settler"]


class Settler(Protocol):
    """Who settles a delivery: frees its slot and sends the ack payload, once."""

    async def settle(self, delivery: Delivery, payload: bytes) -> None:
        """Send `payload` (ack `b""`, `-NAK {...}`, `+TERM`) for `delivery` and free its slot."""

    async def touch(self, delivery: Delivery) -> None:
        """Tell JetStream `delivery` is still being worked on (`+WPI`)."""


class Delivery:
    """One delivery of a JetStream message to a durable consumer.

    `sequence` is the stream sequence as JetStream wrote it (decimal text: it keys ids and
    ledgers), `attempt` the delivery count (1 on the first delivery), `reply` the ack subject
    that names this very delivery.
    """

    __slots__ = (
        "_owner",
        "attempt",
        "data",
        "headers",
        "reply",
        "sequence",
        "settled",
        "stream",
        "subject",
    )

    def __init__(
        self,
        owner: Settler,
        subject: str,
        data: bytes,
        headers: dict[str, str] | None,
        reply: str,
        stream: str,
        sequence: str,
        attempt: int,
    ) -> None:
        self._owner = owner
        self.subject = subject
        self.data = data
        self.headers = headers
        self.reply = reply
        self.stream = stream
        self.sequence = sequence
        self.attempt = attempt
        self.settled = False
        """True once acked, naked or terminated: nothing more may be sent for it."""

    @property
    def message_id(self) -> str | None:
        """The `Nats-Msg-Id` it was published with, if any."""
        headers = self.headers
        return headers.get("Nats-Msg-Id") if headers else None

    def claim_settle(self) -> bool:
        """Mark the delivery settled: True the first time, False (a bug) ever after.

        Synchronous, so two settles racing for one delivery cannot both pass.
        """
        if self.settled:
            return False
        self.settled = True
        return True

    async def ack(self) -> None:
        """Done: everything it produced is stored or delivered."""
        await self._owner.settle(self, ACK)

    async def nak(self, delay: float = 0.0) -> None:
        """Redeliver after `delay` seconds (a consumer's `backoff` does not apply to naks)."""
        await self._owner.settle(self, nak_payload(delay))

    async def term(self) -> None:
        """Never redeliver (after its dead letter is stored)."""
        await self._owner.settle(self, TERM)

    async def in_progress(self) -> None:
        """Still working on it: JetStream restarts its `ack_wait`."""
        await self._owner.touch(self)

    def __repr__(self) -> str:
        return f"<Delivery {self.stream}:{self.sequence} attempt {self.attempt} on {self.subject}>"
