"""The adapter conformance suite: the checks every busway source and sink must pass.

An adapter's test module subclasses a base class and defines one fixture that says how to
configure the adapter and how to see its target; every check then runs for it:

    from busway.testing.conformance import SinkCase, SinkConformance

    class TestMySink(SinkConformance):
        @pytest.fixture
        def sink_case(self, tmp_path: Path) -> SinkCase:
            return SinkCase(
                type="my-sink",
                table='url = "http://127.0.0.1:9/"',
                delivered=read_back_keys,   # what reached the target
                base_dir=tmp_path,
                adapter=my_adapter,         # unless installed as an entry point
            )

Sinks: every message of a batch is written; a redelivered batch (same ids) is not written
twice where the adapter claims idempotency, also by a new instance, nor is a message coming
back under its id with a new stream sequence (a replay); a refused message is
reported (BatchError by index, or the whole batch as Retryable/PermanentError), never
swallowed, and the others arrive; an unreachable target refuses start-up with StartupError or
fails writes as retryable with `ready()` false; `close()` twice is harmless; an unknown config
key is refused by name; the sink delivers inside a running bus.

Sources (checked in a real bus): every input is stored once, right after start-up (a source
calls `started()` only when it takes input), under a `Nats-Msg-Id` that starts with the
source's name; the same inputs met again with the source's state forgotten store nothing new
(deterministic ids); an unknown config key is refused by name.

Needs pytest and pytest's anyio plugin (installed with anyio).
"""

from busway.testing.conformance._sink import SinkCase, SinkConformance, json_payload
from busway.testing.conformance._source import SourceCase, SourceConformance, json_key

__all__ = [
    "SinkCase",
    "SinkConformance",
    "SourceCase",
    "SourceConformance",
    "json_key",
    "json_payload",
]
