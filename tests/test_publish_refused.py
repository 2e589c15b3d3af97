"""A publish JetStream refuses fails at once with JetStream's reason, not after a timeout."""

from __future__ import annotations

import anyio
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.api import DiscardPolicy, StreamConfig

from busway import PublishError
from busway._jetstream import JetStreamPublisher, jetstream

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
