"""A test's own connection to a bus's NATS: publish inputs, read what streams stored.

`busway.testing` uses it to act as the outside world does: it publishes with its own client
(so a message enters JetStream exactly as an external producer's would) and reads outputs back
from the streams, not from core NATS, so what a test sees is what JetStream *stored*: a
publish that the stream dropped as a duplicate is not seen twice. Lives here because nats-py is
imported only under `busway._nats`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from busway._components import Message, PublishAck
from busway._config.model import Config, split_listen
from busway._errors import PublishError
from busway._nats.embedded import local_client
from busway._nats.jetstream import connect, nats_auth

__all__ = ["Tap"]


async def _nothing() -> None:
    return None


class Tap:
    """One NATS connection for a test: publish, follow a subject, read a stream."""

    def __init__(self, client: NatsClient, *, timeout: float) -> None:
        self._client = client
        self._js: JetStreamContext = client.jetstream()
        self._timeout = timeout

    @classmethod
    async def connect(cls, config: Config, url: str) -> Tap:
        """Connect to `url` with the credentials of `config`'s `[nats]` (StartupError if not);
        to a secured embedded server as busway's own user (`local_client`)."""
        auth = nats_auth(config.nats, config.resolve_path)
        if config.nats.servers is None:
            host, port = split_listen(config.nats.listen)
            data_dir = config.resolve_path(config.nats.data_dir)
            _, auth = local_client(config.nats, data_dir, host, port, auth)
        client = await connect(config.nats, [url], on_reconnected=_nothing, auth=auth)
        return cls(client, timeout=float(config.nats.publish_timeout))

    async def close(self) -> None:
        """Close the connection."""
        await self._client.close()

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> PublishAck:
        """Store `data` on `subject`; PublishError unless JetStream confirmed it."""
        try:
            ack = await self._js.publish(
                subject, data, headers=dict(headers) if headers else None, timeout=self._timeout
            )
        except nats.js.errors.NoStreamResponseError:
            raise PublishError(f"no stream captures subject {subject!r}") from None
        except nats.js.errors.APIError as exc:
            raise PublishError(f"JetStream refused {subject!r}: {exc.description}") from None
        except (nats.errors.Error, TimeoutError) as exc:
            raise PublishError(f"publish to {subject!r} failed: {exc!r}") from None
        return PublishAck(stream=ack.stream, sequence=ack.seq or 0, duplicate=bool(ack.duplicate))

    @contextlib.asynccontextmanager
    async def follow(
        self, subject: str, on_message: Callable[[Message], None]
    ) -> AsyncIterator[None]:
        """Call `on_message` for each message stored on `subject` from now on, in order.

        An ordered consumer on the stream that captures `subject` (ValueError if none does):
        its messages are the stored ones, each once, whatever core NATS saw.
        """
        try:
            stream = await self._js.find_stream_name_by_subject(subject)
        except nats.js.errors.NotFoundError:
            raise ValueError(
                f"no stream captures {subject!r}: add a [[streams]] entry whose subjects "
                "include it (busway.testing reads outputs from JetStream)"
            ) from None

        async def deliver(msg: Msg) -> None:
            on_message(_message(msg))

        subscription = await self._js.subscribe(
            subject,
            stream=stream,
            cb=deliver,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.NEW,
        )
        try:
            yield
        finally:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()

    async def stored(self, stream: str) -> list[Message]:
        """Every message `stream` holds now, in order (ValueError if there is no such stream)."""
        try:
            info = await self._js.stream_info(stream)
        except nats.js.errors.NotFoundError:
            raise ValueError(f"no stream named {stream!r}") from None
        messages: list[Message] = []
        sequence = info.state.first_seq
        last = info.state.last_seq
        while info.state.messages and sequence <= last:
            try:
                raw = await self._js.get_msg(stream, seq=sequence, subject=">", next=True)
            except nats.js.errors.NotFoundError:
                break
            if raw.seq is None or raw.seq > last:
                break
            messages.append(
                Message(
                    subject=raw.subject or "",
                    data=raw.data or b"",
                    headers=dict(raw.headers or {}),
                    id=(raw.headers or {}).get("Nats-Msg-Id") or f"{stream}:{raw.seq}",
                    stream=stream,
                    sequence=raw.seq,
                    attempt=1,
                )
            )
            sequence = raw.seq + 1
        return messages


def _message(msg: Msg) -> Message:
    """The busway `Message` for a message a consumer delivered."""
    metadata = msg.metadata
    headers = dict(msg.headers or {})
    stream = metadata.stream
    sequence = metadata.sequence.stream
    return Message(
        subject=msg.subject,
        data=msg.data,
        headers=headers,
        id=headers.get("Nats-Msg-Id") or f"{stream}:{sequence}",
        stream=stream,
        sequence=sequence,
        attempt=metadata.num_delivered or 1,
    )
