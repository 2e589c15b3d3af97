"""`[cluster] replicas`: busway's own assets are copied on a cluster, and impossible counts are
refused with the key to change, before anything starts.

Before `[cluster]` existed, the dead-letter stream and the state bucket were always R1: losing
the one node holding them stopped every daemon from starting ("cannot declare stream
BUSWAY_DEADLETTER").
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js import JetStreamContext

from busway import Bus, ConfigError, StartupError
from tests.cluster_support import nats_cluster
from tests.support import NatsServer, decode_test_config, eventually, stream_messages

pytestmark = pytest.mark.anyio


def cluster_config(urls: list[str], *, replicas: int = 3, extra: str = "") -> str:
    """One R`replicas` stream and a route that dead-letters what is not JSON."""
    servers = ", ".join(f'"{url}"' for url in urls)
    return f"""
[nats]
servers = [{servers}]
connect_timeout = "30s"

[cluster]
replicas = {replicas}
startup_timeout = "60s"

[[streams]]
name = "IN"
subjects = ["in.>"]

[[streams]]
name = "OUT"
subjects = ["out.>"]

[[routes]]
name = "parse"
from = "in.events"
when = "total > `1`"
to = ["out.events"]
{extra}
"""


def test_replicas_must_be_1_3_or_5(tmp_path: Path) -> None:
    text = '[nats]\nservers = ["nats://127.0.0.1:4222"]\n[cluster]\nreplicas = 2\n'  # never bound
    with pytest.raises(ConfigError, match=r"\$\.cluster\.replicas.*1, 3 or 5, got 2"):
        decode_test_config(text, tmp_path)


def test_a_stream_with_4_replicas_is_refused_at_its_key(tmp_path: Path) -> None:
    text = '[[streams]]\nname = "S"\nsubjects = ["s.>"]\nreplicas = 4\n'
    with pytest.raises(ConfigError, match=r"\$\.streams\[0\]\.replicas.*1, 3 or 5"):
        decode_test_config(text, tmp_path)


def test_the_embedded_server_holds_one_copy_only(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\$\.cluster\.replicas.*embedded single nats-server"):
        decode_test_config("[cluster]\nreplicas = 3\n", tmp_path)
    text = '[[streams]]\nname = "S"\nsubjects = ["s.>"]\nreplicas = 3\n'
    with pytest.raises(ConfigError, match=r"\$\.streams\[0\]\.replicas.*needs a NATS cluster"):
        decode_test_config(text, tmp_path)


def test_streams_and_dead_letters_take_the_cluster_replicas_unless_they_say(
    tmp_path: Path,
) -> None:
    config = decode_test_config(
        cluster_config(["nats://127.0.0.1:4222"])  # never bound
        + '[[streams]]\nname = "ONE"\nsubjects = ["one.>"]\nreplicas = 1\n',
        tmp_path,
    )
    assert [(s.name, s.replicas) for s in config.streams] == [("IN", 3), ("OUT", 3), ("ONE", 1)]
    assert config.dead_letter_stream.replicas == 3


async def test_a_standalone_server_refuses_3_replicas_at_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    config = decode_test_config(cluster_config([nats_server.url]), tmp_path)
    with pytest.raises(StartupError, match=r"\[cluster\] replicas = 3.*not part of a cluster"):
        async with Bus(config):
            pass


async def test_losing_the_dead_letter_or_state_leader_stops_neither_start_up_nor_dead_letters(
    tmp_path: Path,
) -> None:
    dedupe = """
[[routes]]
name = "once"
from = "in.once"
to = ["out.once"]
stages = [{ dedupe = { key = "event_id", window = "1m" } }]
"""
    async with nats_cluster(tmp_path / "cluster") as cluster:
        config = decode_test_config(cluster_config(cluster.urls, extra=dedupe), tmp_path)
        client = await nats.connect(cluster.urls)
        try:
            js = client.jetstream()
            async with Bus(config):  # creates the streams, the buckets and the consumers
                await js.publish("in.once", b'{"event_id": "e1"}')
                await eventually(stored(js, "OUT", 1), timeout=60)
            names = [info.config.name for info in await js.streams_info()]
            [dedupe_bucket] = [name for name in names if name.startswith("KV_busway_dedupe_")]
            for stream in ("BUSWAY_DEADLETTER", "KV_busway_state", dedupe_bucket, "IN", "OUT"):
                assert (await js.stream_info(stream)).config.num_replicas == 3, stream
            consumer = await js.consumer_info("IN", "busway-route-parse")
            assert consumer.cluster is not None
            assert len(consumer.cluster.replicas or []) == 2  # the leader and two followers
        finally:
            await client.close()

        for letters, asset in enumerate(("BUSWAY_DEADLETTER", "KV_busway_state"), start=1):
            leader = await cluster.leader_of(asset)
            cluster.kill(leader)
            client = await nats.connect([url for i, url in enumerate(cluster.urls) if i != leader])
            try:
                js = client.jetstream()
                async with Bus(config):
                    # IN may be electing a leader too (the killed node may have led it): a
                    # client publishes again, under one message id, until the stream answers.
                    await eventually(published(js, "in.events", b"not json", f"bad-{letters}"))
                    await eventually(stored(js, "BUSWAY_DEADLETTER", letters), timeout=60)
                dead = await stream_messages(client, "BUSWAY_DEADLETTER")
                assert [letter.subject for letter in dead] == ["busway.deadletter.parse"] * letters
            finally:
                await client.close()
            cluster.restart(leader)
            await cluster.wait_ready()


def published(
    js: JetStreamContext, subject: str, body: bytes, message_id: str
) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: `body` was stored (False while no stream answers)."""

    async def publish() -> bool:
        try:
            await js.publish(subject, body, headers={"Nats-Msg-Id": message_id})
        except nats.errors.Error:
            return False
        return True

    return publish


def stored(js: JetStreamContext, stream: str, count: int) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: `stream` holds `count` messages (False while it cannot answer:
    its leader may be moving)."""

    async def stream_holds() -> bool:
        try:
            return (await js.stream_info(stream)).state.messages == count
        except nats.errors.Error:
            return False

    return stream_holds


async def test_more_replicas_than_servers_fails_after_the_startup_timeout_saying_so(
    tmp_path: Path,
) -> None:
    async with nats_cluster(tmp_path / "cluster") as cluster:
        text = cluster_config(cluster.urls, replicas=5).replace(
            'startup_timeout = "60s"', 'startup_timeout = "2s"'
        )
        config = decode_test_config(text, tmp_path)
        with pytest.raises(StartupError) as raised:
            async with Bus(config):
                pass
    message = str(raised.value)
    assert "no suitable peers for placement (code 10005)" in message, message
    assert "[cluster] startup_timeout" in message, message
    assert "5 replicas need 5 servers up, the cluster has 3 server(s) visible now" in message
