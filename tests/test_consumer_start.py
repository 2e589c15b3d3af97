"""Where a new route or sink starts: `start = "all" | "new" | <RFC 3339 time>`.

Routes added by `Bus.reload` to a stream that already holds messages: "all" processes the
history, "new" only what is stored after the consumer exists, a time starts there; without
`start` the route processes the history (the default) and the log says how much. `start` only
applies when the consumer is created: changing it later is reported as having no effect.
"""

from __future__ import annotations

import logging
from pathlib import Path

import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus, ConfigError
from tests.configs import config_toml, io_streams
from tests.support import NatsServer, decode_test_config, stream_messages, wait_settled

pytestmark = pytest.mark.anyio


def config_text(server: NatsServer, unique: str, routes: dict[str, str | None]) -> str:
    text = config_toml(server, streams=io_streams(unique))
    for name, start in routes.items():
        text += f"""
[[routes]]
name = "{name}{unique}"
from = "in{unique}.orders"
to = ["out{unique}.{name}"]
{f'start = "{start}"' if start is not None else ""}
"""
    return text


async def test_routes_added_by_reload_start_where_their_start_says(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    js = nc.jetstream()
    subject = f"in{unique}.orders"
    before = decode_test_config(config_text(nats_server, unique, {}), tmp_path)
    caplog.set_level(logging.INFO, logger="busway")
    async with Bus(before) as bus:  # creates the streams
        for n in (1, 2, 3):
            await js.publish(subject, orjson.dumps({"n": n}))
        # The timed route starts at message 2, by the time the server stored it.
        stored_at = (await js.get_msg(f"IN_{unique}", 2)).time
        first_at = (await js.get_msg(f"IN_{unique}", 1)).time
        assert stored_at is not None and first_at is not None and first_at < stored_at
        starts = {"all": "all", "new": "new", "timed": stored_at.isoformat(), "default": None}
        after = decode_test_config(config_text(nats_server, unique, starts), tmp_path)
        report = await bus.reload(after)
        assert len(report.added) == 4
        await js.publish(subject, orjson.dumps({"n": 4}))
        for name in starts:
            await wait_settled(nc, f"IN_{unique}", f"busway-route-{name}{unique}")

    seen: dict[str, list[int]] = {}
    for message in await stream_messages(nc, f"OUT_{unique}"):
        route = message.subject.rsplit(".", 1)[1]
        seen.setdefault(route, []).append(orjson.loads(message.data)["n"])
    assert seen == {
        "all": [1, 2, 3, 4],
        "new": [4],
        "timed": [2, 3, 4],
        "default": [1, 2, 3, 4],
    }
    replay_warnings = [r.getMessage() for r in caplog.records if "earlier message" in r.message]
    assert len(replay_warnings) == 1
    assert f"busway-route-default{unique}" in replay_warnings[0]
    assert "3 earlier message(s)" in replay_warnings[0]


async def test_changing_start_of_an_existing_consumer_is_reported_and_changes_nothing(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = decode_test_config(config_text(nats_server, unique, {"r": "new"}), tmp_path)
    second = decode_test_config(config_text(nats_server, unique, {"r": "all"}), tmp_path)
    caplog.set_level(logging.WARNING, logger="busway")
    async with Bus(first) as bus:
        report = await bus.reload(second)
        assert report.changed == [f"route:r{unique}"]
    info = await nc.jetstream().consumer_info(f"IN_{unique}", f"busway-route-r{unique}")
    assert info.config.deliver_policy == "new"
    (warning,) = [r.getMessage() for r in caplog.records if "has no effect" in r.message]
    assert "start = 'all' has no effect" in warning
    assert "it started at new messages" in warning


@pytest.mark.parametrize("start", ["yesterday", "2025-06-01", "2025-06-01T00:00:00", "ALL"])
def test_a_start_that_is_not_all_new_or_a_zoned_time_is_a_config_error(
    nats_server: NatsServer, unique: str, tmp_path: Path, start: str
) -> None:
    with pytest.raises(ConfigError, match='start must be "all", "new" or an RFC 3339 time'):
        decode_test_config(config_text(nats_server, unique, {"r": start}), tmp_path)


def test_an_unquoted_toml_datetime_is_a_start_time(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    text = config_text(nats_server, unique, {"r": "new"}).replace(
        'start = "new"', "start = 2025-06-01T00:00:00Z"
    )
    config = decode_test_config(text, tmp_path)
    assert config.routes[0].start == "2025-06-01T00:00:00+00:00"
