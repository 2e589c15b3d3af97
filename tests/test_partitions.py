"""Keyed partitions: the stream's subject transform, the config checks, and one bus.

A partitioned stream stores `events.<key>` as `events.<key>.<partition>` (nats-server computes
the partition); a partitioned route reads each partition through its own consumer. Several
daemons sharing partitions are in tests/test_partitions_daemons.py.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.js.errors import KeyNotFoundError

from busway import Bus
from busway._cli.orphans import orphaned_consumers
from busway._config.model import StreamConfig, StreamPartition
from busway._errors import ConfigError
from busway._nats.cluster import ConsumerSummary
from busway._nats.jetstream import state_bucket
from busway._nats.lease import LeaseKeeper, lease_key
from busway._nats.partition_subjects import consumer_filter, partition_filter, subject_transform
from busway._routing.partitions import assign
from tests.configs import config_toml, stream_table
from tests.support import NatsServer, decode_test_config, eventually, stream_messages

pytestmark = pytest.mark.anyio


def test_the_transform_appends_the_partition_of_the_key_tokens() -> None:
    stream = StreamConfig(
        name="E", subjects=["events.*.x.*"], partition=StreamPartition(count=8, key=[2])
    )
    assert subject_transform(stream) == (
        "events.*.x.*",
        "events.{{wildcard(1)}}.x.{{wildcard(2)}}.{{partition(8,2)}}",
    )
    every = StreamConfig(name="E", subjects=["a.*.*"], partition=StreamPartition(count=4))
    assert subject_transform(every) == (
        "a.*.*",
        "a.{{wildcard(1)}}.{{wildcard(2)}}.{{partition(4,1,2)}}",
    )
    assert subject_transform(StreamConfig(name="E", subjects=["a.*"])) is None


def test_filters_on_a_partitioned_stream_take_the_partition_token() -> None:
    partitioned = StreamConfig(name="E", subjects=["e.*"], partition=StreamPartition(count=2))
    assert consumer_filter("e.*", partitioned) == "e.*.*"
    assert consumer_filter("e.a", partitioned) == "e.a.*"
    assert consumer_filter("e.>", partitioned) == "e.>"
    assert consumer_filter("e.*", StreamConfig(name="E", subjects=["e.*"])) == "e.*"
    assert partition_filter("e.*", 3) == "e.*.3"


def test_partitions_are_shared_fairly_and_each_has_one_member() -> None:
    members = ["a", "b", "c"]
    shares = [assign(members, 8, member) for member in members]
    assert sorted(len(share) for share in shares) == [2, 3, 3]
    assert sorted(i for share in shares for i in share) == list(range(8))
    assert assign(members, 8, "d") == frozenset()
    assert assign(["a"], 4, "a") == frozenset(range(4))


def _route_config(nats: NatsServer, unique: str, *, stream: str, route: str) -> str:
    return config_toml(nats, streams=[stream, stream_table(f"OUT_{unique}", f"out{unique}.>")]) + (
        f'[[routes]]\nname = "r{unique}"\nfrom = "ev{unique}.*"\nto = ["out{unique}.x"]\n{route}\n'
    )


@pytest.mark.parametrize(
    ("stream", "route", "path", "says"),
    [
        ("", "partitioned = true\nmax_in_flight = 1", "$.routes[0].partitioned", "needs a part"),
        (
            "partition = { count = 4 }",
            "partitioned = true",
            "$.routes[0].max_in_flight",
            "set max_in_flight = 1",
        ),
        (
            "partition = { count = 4, key = [2] }",
            "",
            "$.streams[0].partition.key[0]",
            "has 1 `*` token",
        ),
    ],
)
def test_partition_settings_are_checked_with_their_path(
    nats_server: NatsServer,
    unique: str,
    tmp_path: Path,
    stream: str,
    route: str,
    path: str,
    says: str,
) -> None:
    table = stream_table(f"EV_{unique}", f"ev{unique}.*") + stream
    with pytest.raises(ConfigError) as caught:
        decode_test_config(_route_config(nats_server, unique, stream=table, route=route), tmp_path)
    assert caught.value.path == path
    assert says in str(caught.value)


def test_a_partitioned_stream_has_one_subject_without_a_tail_wildcard(tmp_path: Path) -> None:
    for subjects, says in ((["a.*", "b.*"], "exactly one subject"), (["a.>"], "no `>`")):
        text = stream_table("A", *subjects) + "partition = { count = 2 }\n"
        with pytest.raises(ConfigError, match=says):
            decode_test_config(text, tmp_path)


async def test_a_partitioned_route_and_a_plain_one_both_read_a_partitioned_stream(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    stream = stream_table(f"EV_{unique}", f"ev{unique}.*") + "partition = { count = 4 }\n"
    text = _route_config(
        nats_server, unique, stream=stream, route="partitioned = true\nmax_in_flight = 1"
    ) + (f'[[routes]]\nname = "plain{unique}"\nfrom = "ev{unique}.*"\nto = ["out{unique}.plain"]\n')
    config = decode_test_config(text, tmp_path)
    js = nc.jetstream()
    keys = [f"k{i}" for i in range(10)]
    async with Bus(config):
        for n in range(5):
            for key in keys:
                await js.publish(f"ev{unique}.{key}", orjson.dumps({"key": key, "n": n}))

        async def all_routed() -> bool:
            info = await js.stream_info(f"OUT_{unique}")
            return info.state.messages >= 100

        await eventually(all_routed)
    stored = await stream_messages(nc, f"EV_{unique}")
    partitions = {m.subject.rsplit(".", 1)[1] for m in stored}
    assert partitions <= {"0", "1", "2", "3"}
    assert len(partitions) > 1, "10 keys all in one of 4 partitions: the transform is not used"
    by_key: dict[str, set[str]] = {}
    for message in stored:
        by_key.setdefault(message.subject.split(".")[1], set()).add(message.subject)
    assert all(len(subjects) == 1 for subjects in by_key.values())  # a key keeps its partition
    outputs = await stream_messages(nc, f"OUT_{unique}")
    partitioned = [orjson.loads(m.data) for m in outputs if m.subject == f"out{unique}.x"]
    plain = [orjson.loads(m.data) for m in outputs if m.subject == f"out{unique}.plain"]
    assert len(plain) == 50
    assert len(partitioned) == 50
    for key in keys:
        assert [doc["n"] for doc in partitioned if doc["key"] == key] == list(range(5))
    consumers = {
        c.name for c in await js.consumers_info(f"EV_{unique}") if c.name.startswith("busway-")
    }
    assert consumers == {f"busway-route-r{unique}-p{i}" for i in range(4)} | {
        f"busway-route-plain{unique}"
    }


def test_orphans_are_the_partitions_beyond_the_count_and_the_unpartitioned_consumer(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    stream = stream_table(f"EV_{unique}", f"ev{unique}.*") + "partition = { count = 2 }\n"
    config = decode_test_config(
        _route_config(
            nats_server, unique, stream=stream, route="partitioned = true\nmax_in_flight = 1"
        ),
        tmp_path,
    )
    names = [f"busway-route-r{unique}{suffix}" for suffix in ("", "-p0", "-p1", "-p2")]
    consumers = [ConsumerSummary(f"EV_{unique}", name, 0, 0) for name in names]
    orphans = [c.name for c in orphaned_consumers(config, consumers)]
    assert orphans == [f"busway-route-r{unique}", f"busway-route-r{unique}-p2"]


async def test_a_lease_whose_last_renewal_went_unanswered_is_still_released(
    nc: NatsClient, unique: str
) -> None:
    """A partition handed over cancels the lease's renewal task; a renewal stored by the server
    whose answer never arrived leaves the holder one revision behind. Releasing must still
    delete the key (it names this holder), or the next owner waits a whole ttl."""
    bucket = await state_bucket(nc.jetstream(), "busway_state")
    key = lease_key(f"=route.r{unique}", "p0")
    keeper = LeaseKeeper(bucket, key, ttl=30.0, holder="me")
    async with keeper.hold() as lease:
        entry = await bucket.get(key)
        await bucket.update(key, entry.value or b"", last=lease.revision)  # the lost answer
    with pytest.raises(KeyNotFoundError):
        await bucket.get(key)


async def test_a_dead_letter_of_a_partitioned_stream_names_the_subject_as_published(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """Stored as `ev.k1.<partition>`, published as `ev.k1`: a replay must go to the latter,
    which the stream captures (the former it does not)."""
    stream = stream_table(f"EV_{unique}", f"ev{unique}.*") + "partition = { count = 4 }\n"
    text = config_toml(
        nats_server,
        streams=[stream, stream_table(f"OUT_{unique}", f"out{unique}.>")],
        dead_letter=unique,
    ) + (
        f'[[routes]]\nname = "r{unique}"\nfrom = "ev{unique}.*"\nto = ["out{unique}.x"]\n'
        'partitioned = true\nmax_in_flight = 1\ntransform = "{n: n}"\n'
    )
    config = decode_test_config(text, tmp_path)
    js = nc.jetstream()
    async with Bus(config):
        await js.publish(f"ev{unique}.k1", b"not json")

        async def dead_lettered() -> bool:
            return int((await js.stream_info(f"DL_{unique}")).state.messages) >= 1

        await eventually(dead_lettered)
    [letter] = await stream_messages(nc, f"DL_{unique}")
    assert letter.headers is not None
    assert letter.headers["Busway-Original-Subject"] == f"ev{unique}.k1"


async def test_a_reload_that_changes_the_partition_count_restarts_the_route_on_it(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    def config_with(count: int) -> str:
        stream = (
            stream_table(f"EV_{unique}", f"ev{unique}.*") + f"partition = {{ count = {count} }}\n"
        )
        return _route_config(
            nats_server, unique, stream=stream, route="partitioned = true\nmax_in_flight = 1"
        )

    js = nc.jetstream()
    async with Bus(decode_test_config(config_with(2), tmp_path)) as bus:
        report = await bus.reload(decode_test_config(config_with(4), tmp_path))
        assert f"route:r{unique}" in report.changed
        for key in range(20):
            await js.publish(f"ev{unique}.k{key}", orjson.dumps({"key": key}))

        async def all_routed() -> bool:
            return int((await js.stream_info(f"OUT_{unique}")).state.messages) >= 20

        await eventually(all_routed)
    stored = await stream_messages(nc, f"EV_{unique}")
    assert {m.subject.rsplit(".", 1)[1] for m in stored} - {"0", "1"}, "no key beyond p1"
