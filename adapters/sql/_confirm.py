"""Collect the PubAcks of everything a poll publishes: the one gate before any commit."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Awaitable, Mapping
from types import TracebackType

import anyio

from busway import PublishAck, Publisher, PublishError

__all__ = ["Confirmations"]


class Confirmations:
    """Pipelined publishes of one poll, confirmed together.

        async with Confirmations(publisher) as confirmations:
            for row in rows:
                await confirmations.publish(subject, data, headers)
            await confirmations.wait()      # every PubAck, or the first PublishError

    Leaving the block early (an error, a cancellation) abandons the confirmations nobody
    awaited, so none lingers unawaited; their messages may or may not be stored, which the
    deterministic Nats-Msg-Id of the retry makes harmless.
    """

    def __init__(self, publisher: Publisher) -> None:
        self._publisher = publisher
        self._pending: list[Awaitable[PublishAck]] = []

    def __len__(self) -> int:
        return len(self._pending)

    async def __aenter__(self) -> Confirmations:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        for confirmation in self._pending:
            if inspect.iscoroutine(confirmation):
                confirmation.close()

    async def publish(self, subject: str, data: bytes, headers: Mapping[str, str]) -> None:
        """Send one message now; its PubAck is awaited by `wait`."""
        self._pending.append(
            await self._publisher.publish_pipelined(subject, data, headers=headers)
        )

    async def wait(self) -> None:
        """Wait for every PubAck; raise the first PublishError after all have settled.

        Waiting for all, even after a failure, leaves nothing running behind the caller's back
        while it rolls back and retries. After a failure the rest are awaited side by side:
        one by one, a refused batch would cost one publish timeout per message.

        The last one is awaited first: PubAcks arrive in order, so once it is in, the others
        are too and each costs a lookup instead of a timed wait.
        """
        pending = self._pending[-1:] + self._pending[:-1]
        for index, confirmation in enumerate(pending):
            try:
                await confirmation
            except PublishError:
                async with anyio.create_task_group() as tg:
                    for rest in pending[index + 1 :]:
                        tg.start_soon(_settle, rest)
                raise


async def _settle(confirmation: Awaitable[PublishAck]) -> None:
    with contextlib.suppress(PublishError):
        await confirmation
