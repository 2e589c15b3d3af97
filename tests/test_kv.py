"""The KV wrapper the engine uses (`busway._nats.kv.Bucket`): absent keys are values, failures
are busway errors naming the bucket and key."""

from __future__ import annotations

import nats
import pytest
from nats.aio.client import Client as NatsClient

from busway._errors import BusUnavailable, RetryableError
from busway._nats.kv import Bucket, open_bucket
from tests.support import NatsServer

pytestmark = pytest.mark.anyio


async def test_a_bucket_reads_absent_keys_as_none_and_creates_once(
    nc: NatsClient, unique: str
) -> None:
    bucket = await open_bucket(nc.jetstream(), f"kv_{unique}", ttl=60)
    assert await bucket.get("a") is None
    assert await bucket.create("a", b"1") is True
    assert await bucket.create("a", b"2") is False
    assert await bucket.get("a") == b"1"
    await bucket.put("p.x", b"x")
    await bucket.put("p.y", b"y")
    assert sorted(await bucket.entries("p.>")) == [("p.x", b"x"), ("p.y", b"y")]
    await bucket.delete("a")
    assert await bucket.get("a") is None
    assert await bucket.create("a", b"3") is True  # a deleted key can be created again


async def test_a_lost_connection_is_a_retryable_error_naming_bucket_and_key(
    nats_server: NatsServer, unique: str
) -> None:
    client = await nats.connect(nats_server.url)
    bucket = await open_bucket(client.jetstream(), f"kv_{unique}", ttl=60)
    await client.close()
    with pytest.raises(BusUnavailable, match=f"cannot store 'k' in bucket 'kv_{unique}'") as lost:
        await bucket.put("k", b"v")
    assert isinstance(lost.value, RetryableError)
    assert isinstance(bucket, Bucket)
