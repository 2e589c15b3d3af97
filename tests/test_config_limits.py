"""The edges of what `busway check` accepts start on a real nats-server.

`check` refuses what JetStream would refuse at start-up (a 50 ms duplicate window, a 1 ms
max_age...); these configs sit exactly on the accepted side of every bound, at both ends, and
must start: a config that check accepts does not fail `busway run` for its values.

(The smallest config turns the HTTP listener off: with `shutdown_timeout = "0s"` the listener is
cancelled before uvicorn closes its server socket, which only a ResourceWarning reports; that
shutdown path is not this file's subject.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from busway import Bus, ConfigError
from tests.support import NatsServer, decode_test_config

pytestmark = pytest.mark.anyio

LONGEST = '"36500d"'  # 100 years, the longest duration accepted
SHORTEST_AGE = '"100ms"'  # JetStream's shortest max_age and duplicate window
# connect_timeout's shortest is 500ms (config check)


def edge_config(server: NatsServer, unique: str, *, big: bool) -> str:
    duration = LONGEST if big else '"1ms"'
    count = 1_000_000 if big else 1
    age = LONGEST if big else SHORTEST_AGE
    start = "9999-12-31T23:59:59Z" if big else "0001-01-01T00:00:00+00:00"
    return f"""
shutdown_timeout = {duration if big else '"0s"'}

[nats]
servers = ["{server.url}"]
publish_timeout = {duration}
connect_timeout = {duration if big else '"500ms"'}
publish_window = {count}

[http]
listen = {'"127.0.0.1:0"' if big else '""'}

[[streams]]
name = "EDGE_{unique}"
subjects = ["edge{unique}.>"]
duplicate_window = {age}
max_age = {age}
max_msgs = {9_223_372_036_854_775_807 if big else 1}

[[routes]]
name = "r{unique}"
from = "edge{unique}.in"
to = ["edge{unique}.out"]
max_in_flight = {count}
ack_wait = {duration}
hop_limit = {10_000 if big else 1}
start = "{start}"
retry = {{ max_attempts = {count}, backoff = {duration}, max_backoff = {duration} }}

[[sinks]]
name = "s{unique}"
type = "file"
from = "edge{unique}.out"
path = "out.jsonl"
batch_size = {count}
batch_wait = {duration}
max_in_flight = {count}
index_size = {count}
ack_wait = {duration}
circuit = {{ failures = {count}, cool_down = {duration} }}
"""


@pytest.mark.parametrize("big", [True, False], ids=["largest", "smallest"])
async def test_the_edges_of_every_accepted_range_start(
    nats_server: NatsServer, unique: str, tmp_path: Path, big: bool
) -> None:
    config = decode_test_config(edge_config(nats_server, unique, big=big), tmp_path)
    async with Bus(config) as bus:
        assert all(bus.readiness().values()), bus.readiness()


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('duplicate_window = "100ms"', 'duplicate_window = "99ms"', "at least 100ms"),
        ('max_age = "100ms"', 'max_age = "99ms"', "at least 100ms"),
        ("max_msgs = 1", "max_msgs = 0", ">= 1"),
        ('ack_wait = "1ms"', 'ack_wait = "0s"', "ack_wait must be more than 0s"),
    ],
)
def test_one_step_past_an_edge_is_refused(
    nats_server: NatsServer, unique: str, tmp_path: Path, old: str, new: str, message: str
) -> None:
    text = edge_config(nats_server, unique, big=False)
    assert old in text
    with pytest.raises(ConfigError, match=message):
        decode_test_config(text.replace(old, new, 1), tmp_path)
