"""nats-py's private attributes busway relies on (`busway._nats.internals`), and their fallbacks.

The first test is the alarm: a nats-py upgrade that renames one of them fails here, by name and
version, rather than silently moving busway to its slower public fallbacks. The others prove
the fallbacks work, so such an upgrade degrades speed, not correctness.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.client import __version__ as nats_version
from nats.js.api import StreamConfig

from busway import Bus
from busway._nats import internals
from busway._nats.jetstream import jetstream
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled

pytestmark = pytest.mark.anyio


class _Without:
    """`target` with the attribute `missing` gone, as a nats-py that renamed it would be."""

    def __init__(self, target: Any, missing: str) -> None:
        self._target = target
        self._missing = missing

    def __getattr__(self, name: str) -> Any:
        if name == self._missing:
            raise AttributeError(name)
        return getattr(self._target, name)


@pytest.fixture
def restore_internals(nc: NatsClient) -> Iterator[None]:
    """Whatever a test does to the fast path, the next connection finds it as it should be."""
    yield
    internals.check(nc, nc.jetstream())
    internals.set_fast_publish(True)


async def test_every_private_attribute_busway_uses_exists(nc: NatsClient, unique: str) -> None:
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=f"W_{unique}", subjects=[f"w{unique}"]))
    await (await js.publish_async(f"w{unique}"))  # nats-py sets up its reply inbox lazily
    missing = internals.missing_attributes(nc, js)
    assert not missing, (
        f"nats-py {nats_version} lacks {', '.join(missing)}: busway falls back to the public "
        "path for it (see busway/_nats/internals.py); update internals.py for this version"
    )
    assert isinstance(js._publish_async_futures, dict)
    assert callable(js._publish_async_pending_semaphore.locked)
    assert callable(nc._nuid.next) and callable(nc._send_command)
    assert isinstance(nc._server_info, dict) and nc._server_info.get("server_name")


async def test_a_missing_attribute_is_reported_once_by_name_and_its_path_falls_back(
    nc: NatsClient, unique: str, caplog: pytest.LogCaptureFixture, restore_internals: None
) -> None:
    js = jetstream(nc, window=16)
    await js.add_stream(StreamConfig(name=f"FB_{unique}", subjects=[f"fb{unique}.>"]))
    renamed = _Without(nc, "_nuid")
    with caplog.at_level(logging.WARNING, logger="busway.nats"):
        internals.check(renamed, js)  # type: ignore[arg-type]
        internals.check(renamed, js)  # type: ignore[arg-type]
    warnings = [r.getMessage() for r in caplog.records if "Client._nuid" in r.getMessage()]
    assert len(warnings) == 1
    assert nats_version in warnings[0]
    assert not internals.available("Client._nuid")

    future = await internals.publish_output(js, f"fb{unique}.a", b"1", f"id-{unique}", None)
    again = await internals.publish_output(js, f"fb{unique}.a", b"1", f"id-{unique}", None)
    acks = [await future, await again]
    assert [bool(ack.duplicate) for ack in acks] == [False, True]
    stored = await js.get_msg(f"FB_{unique}", acks[0].seq)
    assert stored.headers == {"Nats-Msg-Id": f"id-{unique}"}


async def test_server_name_without_server_info_is_unknown_not_wrong(nc: NatsClient) -> None:
    assert internals.server_name(nc) is not None
    assert internals.server_name(_Without(nc, "_server_info")) is None  # type: ignore[arg-type]


async def test_a_route_hop_works_with_the_fast_path_disabled(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    restore_internals: None,
) -> None:
    """With the fast path off, outputs go through nats-py's `publish_async`: same ids, same
    dedup, every input acked once."""
    checked = internals.check

    def check_without_fast_path(client: Any, js: Any) -> None:
        checked(client, js)
        internals.set_fast_publish(False)

    async def no_frame(*_: Any) -> Any:
        raise AssertionError("the fast path ran while disabled")

    monkeypatch.setattr(internals, "check", check_without_fast_path)
    monkeypatch.setattr(internals, "_publish_frame", no_frame)
    config = decode_test_config(
        f"""
[nats]
servers = ["{nats_server.url}"]
publish_timeout = "2s"

[[streams]]
name = "IN_{unique}"
subjects = ["in{unique}.>"]

[[streams]]
name = "OUT_{unique}"
subjects = ["out{unique}.>"]

[[routes]]
name = "r{unique}"
from = "in{unique}.orders"
to = ["out{unique}.a"]
""",
        tmp_path,
    )
    js = nc.jetstream()
    async with Bus(config) as bus:
        for n in range(20):
            await js.publish(f"in{unique}.orders", orjson.dumps({"n": n}))
        await wait_settled(nc, f"IN_{unique}", f"busway-route-r{unique}")
        assert bus.metrics.stats[0].published == 20
    outputs = await stream_messages(nc, f"OUT_{unique}")
    assert [orjson.loads(m.data)["n"] for m in outputs] == list(range(20))
    ids = [(m.headers or {}).get("Nats-Msg-Id") for m in outputs]
    assert ids == [f"IN_{unique}:{seq}:r{unique}:0" for seq in range(1, 21)]
