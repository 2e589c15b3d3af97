"""Publishing: a refusal fails at once with JetStream's reason; the fast path keeps the id."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, StreamConfig

from busway import PublishError
from busway._nats.internals import publish_output
from busway._nats.jetstream import JetStreamPublisher, jetstream

pytestmark = pytest.mark.anyio


async def test_a_full_stream_refuses_with_its_reason(nc: NatsClient, unique: str) -> None:
    js = jetstream(nc, window=16)
    await js.add_stream(
        StreamConfig(
            name=f"FULL_{unique}",
            subjects=[f"full{unique}.>"],
            max_msgs=1,
            discard=DiscardPolicy.NEW,
        )
    )
    # A long timeout: were the refusal lost, the publish would wait all of it.
    publisher = JetStreamPublisher(js, timeout=60)
    first = await publisher.publish(f"full{unique}.a", b"1")
    assert first.sequence == 1
    with anyio.fail_after(30):  # a guard against the old hang, far below the 60 s timeout
        with pytest.raises(PublishError, match="maximum messages exceeded") as refused:
            await publisher.publish(f"full{unique}.a", b"2")
    assert "no PubAck" not in str(refused.value)


async def test_the_fast_publish_carries_the_message_id(nc: NatsClient, unique: str) -> None:
    """The route's publish path builds the HPUB frame itself: same id header, same dedup."""
    js = jetstream(nc, window=16)
    await js.add_stream(StreamConfig(name=f"FAST_{unique}", subjects=[f"fast{unique}.>"]))
    await js.publish_async(f"fast{unique}.warm", b"0")  # nats-py sets up its reply inbox
    first = await publish_output(js, f"fast{unique}.a", b'{"n":1}', "id-1", None)
    again = await publish_output(js, f"fast{unique}.a", b'{"n":1}', "id-1", None)
    other = await publish_output(js, f"fast{unique}.a", b'{"n":2}', "id-2", None)
    acks = [await future for future in (first, again, other)]
    assert [bool(ack.duplicate) for ack in acks] == [False, True, False]
    stored = await js.get_msg(f"FAST_{unique}", acks[2].seq)
    assert stored.data == b'{"n":2}'
    assert stored.headers == {"Nats-Msg-Id": "id-2"}
    assert js.publish_async_pending() == 0  # every future resolved and released its slot
