"""Request-reply over the bus: publish durably with a reply inbox, wait for the answer.

A request to a subject that a stream captures cannot use core NATS request-reply: JetStream
itself answers the publish (with its PubAck). So the request is stored in the stream like any
message, carrying `Busway-Reply-To: <inbox>`; the route that handles it ends with a `reply`
stage, which publishes its answer to that inbox on core NATS. Subjects no stream captures
(a NATS micro-service, say) get a plain core NATS request.

One wildcard subscription serves every request of a connection (like nats-py's own request
multiplexer), so a request costs a publish and a dict entry, not a subscription.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import nats.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext

from busway._errors import BusUnavailable
from busway._nats.errors import map_exceptions
from busway._nats.jetstream import publish_confirmed
from busway.routers.pipeline import REPLY_TO_HEADER

__all__ = ["Requester"]


class Requester:
    """Sends requests and routes their answers back to the waiting caller."""

    def __init__(
        self,
        client: NatsClient,
        js: JetStreamContext,
        *,
        is_stored: Callable[[str], bool],
        publish_timeout: float,
    ) -> None:
        self._client = client
        self._js = js
        self._is_stored = is_stored
        self._publish_timeout = publish_timeout
        self._prefix = client.new_inbox()
        self._waiting: dict[str, asyncio.Future[Msg]] = {}
        self._subscription: Subscription | None = None

    async def _subscribe(self) -> None:
        with map_exceptions("cannot subscribe to request answers"):
            self._subscription = await self._client.subscribe(f"{self._prefix}.*", cb=self._answer)

    async def _answer(self, message: Msg) -> None:
        waiter = self._waiting.pop(message.subject.rpartition(".")[2], None)
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    async def request(
        self,
        subject: str,
        body: bytes,
        headers: dict[str, str],
        timeout: float,
        *,
        message_id: str | None = None,
    ) -> Msg:
        """Publish `body` to `subject` and return the answer; TimeoutError after `timeout`.

        For a stored subject the request is durable before we wait (a PublishError if it
        could not be stored); `message_id` lets a retried request be deduplicated. The answer
        has `data` and `headers`.
        """
        if not self._is_stored(subject):
            try:
                return await self._client.request(subject, body, timeout=timeout, headers=headers)
            except nats.errors.TimeoutError:
                raise TimeoutError(f"no answer from {subject!r} within {timeout:g}s") from None
            except nats.errors.NoRespondersError:
                raise TimeoutError(f"nothing answers requests on {subject!r}") from None
            except nats.errors.Error as exc:
                raise BusUnavailable(
                    f"request to {subject!r}: {exc or type(exc).__name__}"
                ) from exc
        if self._subscription is None:
            await self._subscribe()
        token = uuid.uuid4().hex
        waiter: asyncio.Future[Msg] = asyncio.get_running_loop().create_future()
        self._waiting[token] = waiter
        try:
            headers = {**headers, REPLY_TO_HEADER: f"{self._prefix}.{token}"}
            headers["Nats-Msg-Id"] = message_id or token
            await publish_confirmed(
                self._js, subject, body, headers=headers, timeout=self._publish_timeout
            )
            try:
                return await asyncio.wait_for(waiter, timeout)
            except TimeoutError:
                raise TimeoutError(f"no answer from {subject!r} within {timeout:g}s") from None
        finally:
            self._waiting.pop(token, None)
