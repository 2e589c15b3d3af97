"""Embedding busway: an application registers its own sink, and the engine keeps its contract.

The sink here is the application's own code (in memory, by design); NATS is real. It answers
each batch with the per-message outcomes a sink may report, and the test checks what the engine
does with each: delivered = acked, retryable = redelivered later, permanent = dead-lettered.
"""

from __future__ import annotations

import gc
import importlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import msgspec
import orjson
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient

from busway import (
    Adapter,
    AdapterRegistry,
    BatchError,
    BuildContext,
    Bus,
    ConfigError,
    DeliveryError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
    SinkConfig,
    Source,
    SourceConfig,
    SourceContext,
    decode_config,
)
from tests.configs import config_toml, stream_table
from tests.support import (
    REPO,
    Daemons,
    NatsServer,
    decode_test_config,
    free_port,
    stream_messages,
    wait_settled,
)

pytestmark = pytest.mark.anyio


class MemorySinkConfig(SinkConfig, tag="memory", frozen=True, kw_only=True):
    """Config of the application's sink: which bodies to reject."""

    reject: list[str] = msgspec.field(default_factory=list)
    flaky: list[str] = msgspec.field(default_factory=list)


class MemorySink(Sink):
    """Keeps delivered bodies; rejects `reject` for good and fails `flaky` once."""

    def __init__(self, config: MemorySinkConfig, context: BuildContext) -> None:
        self.config = config
        self.delivered: list[str] = []
        self.failed_once: set[str] = set()
        self.attempts: dict[str, list[int]] = {}

    async def write(self, batch: Sequence[Message]) -> None:
        failures: dict[int, DeliveryError] = {}
        for index, message in enumerate(batch):
            name = orjson.loads(message.data)["name"]
            self.attempts.setdefault(name, []).append(message.attempt)
            if name in self.config.reject:
                failures[index] = PermanentError(f"{name} is not accepted here")
            elif name in self.config.flaky and name not in self.failed_once:
                self.failed_once.add(name)
                failures[index] = RetryableError("peer busy", retry_after=0.05)
            else:
                self.delivered.append(name)
        if failures:
            raise BatchError(failures)


async def test_custom_sink_outcomes_are_acked_retried_or_dead_lettered(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    registry = AdapterRegistry(
        [Adapter(type="memory", sink_config=MemorySinkConfig, create_sink=MemorySink)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(f"APP_{unique}", f"app{unique}.>")])
        + f"""
[[sinks]]
name = "mem{unique}"
type = "memory"
from = "app{unique}.>"
reject = ["bad"]
flaky = ["slow"]
retry = {{ backoff = "10ms", max_backoff = "50ms" }}
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, registry=registry)
    sink = bus.plan.sinks[0][1]
    assert isinstance(sink, MemorySink)
    js = nc.jetstream()
    async with bus:
        for name in ("a", "bad", "slow", "b"):
            await js.publish(f"app{unique}.x", orjson.dumps({"name": name}))

        await wait_settled(nc, f"APP_{unique}", f"busway-sink-mem{unique}")
        stats = bus.metrics.stats[0]
        assert (stats.published, stats.retried, stats.dead_lettered) == (3, 1, 1)

    assert sorted(sink.delivered) == ["a", "b", "slow"]
    assert sink.attempts["slow"] == [1, 2]
    assert sink.attempts["bad"] == [1]
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.mem{unique}"
    ]
    assert [orjson.loads(m.data)["name"] for m in dead] == ["bad"]
    assert dead[0].headers
    assert dead[0].headers["Busway-Error"] == "bad is not accepted here"
    assert dead[0].headers["Busway-Component-Kind"] == "sink"


def test_an_adapter_must_give_config_and_factory_together() -> None:
    with pytest.raises(TypeError, match="give both sink_config and create_sink"):
        Adapter(type="broken", sink_config=MemorySinkConfig)


class SlowSinkConfig(SinkConfig, tag="slow", frozen=True, kw_only=True):
    """Config of a sink that takes `delay` seconds per batch."""

    delay: float = 0.0


class SlowSink(Sink):
    """Records every delivery attempt; each batch takes `delay` seconds."""

    def __init__(self, config: SlowSinkConfig, context: BuildContext) -> None:
        self.delay = config.delay
        self.seen: list[tuple[str, int]] = []

    async def write(self, batch: Sequence[Message]) -> None:
        self.seen.extend((message.id, message.attempt) for message in batch)
        await anyio.sleep(self.delay)


async def test_messages_held_longer_than_ack_wait_are_not_redelivered(
    nats_server: NatsServer, nc: NatsClient, unique: str
) -> None:
    """The engine keeps held messages alive (+WPI) while a slow sink works on them."""
    registry = AdapterRegistry(
        [Adapter(type="slow", sink_config=SlowSinkConfig, create_sink=SlowSink)]
    )
    config = decode_config(
        config_toml(nats_server, streams=[stream_table(f"SLOW_{unique}", f"slow{unique}.>")])
        + f"""
[[sinks]]
name = "slow{unique}"
type = "slow"
from = "slow{unique}.>"
ack_wait = "1s"
delay = 3.5
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, registry=registry)
    sink = bus.plan.sinks[0][1]
    assert isinstance(sink, SlowSink)
    async with bus:
        await nc.jetstream().publish(f"slow{unique}.x", b"{}")

        await wait_settled(nc, f"SLOW_{unique}", f"busway-sink-slow{unique}")
    assert sink.seen == [(f"SLOW_{unique}:1", 1)]


class CountingSourceConfig(SourceConfig, tag="counting", frozen=True, kw_only=True):
    """Config of a source that publishes `count` numbered messages, resuming from its state."""

    count: int


class CountingSource(Source):
    """Publishes messages pipelined and records its progress in the state store."""

    def __init__(self, config: CountingSourceConfig, context: BuildContext) -> None:
        self.config = config
        self.published = anyio.Event()

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        start = int(await context.state.get("next") or b"0")
        confirmations = [
            await context.publisher.publish_pipelined(
                self.config.subject,
                orjson.dumps({"n": n}),
                headers={"Nats-Msg-Id": f"counting:{n}"},
            )
            for n in range(start, start + self.config.count)
        ]
        for confirmation in confirmations:
            await confirmation
        await context.state.put("next", str(start + self.config.count).encode())
        self.published.set()
        await anyio.sleep_forever()


async def test_source_publishes_pipelined_and_resumes_from_its_durable_state(
    nats_server: NatsServer, nc: NatsClient, unique: str
) -> None:
    registry = AdapterRegistry(
        [Adapter(type="counting", source_config=CountingSourceConfig, create_source=CountingSource)]
    )
    config = decode_config(
        config_toml(
            nats_server,
            top={"state_bucket": f"state_{unique}"},
            streams=[stream_table(f"COUNT_{unique}", f"count{unique}.>")],
        )
        + f"""
[[sources]]
name = "counter"
type = "counting"
subject = "count{unique}.n"
count = 300
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    for _ in range(2):
        bus = Bus(config, registry=registry)
        source = bus.plan.sources[0][1]
        assert isinstance(source, CountingSource)
        async with bus:
            await source.published.wait()
    stored = await stream_messages(nc, f"COUNT_{unique}")
    assert [orjson.loads(m.data)["n"] for m in stored] == list(range(600))


# --- An application's adapters next to the built-ins ----------------------------------------


class CollectSinkConfig(SinkConfig, tag="collect", frozen=True, kw_only=True):
    """Config of an application's sink that keeps what it receives."""


class CollectSink(Sink):
    """Keeps every delivered body, and says when one arrives."""

    def __init__(self, config: CollectSinkConfig, context: BuildContext) -> None:
        self.bodies: list[bytes] = []
        self.arrived = anyio.Event()

    async def write(self, batch: Sequence[Message]) -> None:
        self.bodies.extend(message.data for message in batch)
        self.arrived.set()


COLLECT = Adapter(type="collect", sink_config=CollectSinkConfig, create_sink=CollectSink)


async def test_an_application_adds_its_adapter_to_the_built_ins_in_one_call(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """One stream fans out to a built-in `file` sink and the application's `collect` sink."""
    path = tmp_path / "busway.toml"
    path.write_text(
        f"""
[nats]
servers = ["{nats_server.url}"]

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "MIX_{unique}"
subjects = ["mix{unique}.>"]

[[sinks]]
name = "file{unique}"
type = "file"
from = "mix{unique}.>"
path = "out.jsonl"

[[sinks]]
name = "collect{unique}"
type = "collect"
from = "mix{unique}.>"
"""
    )
    bus = Bus.from_file(path, adapters=[COLLECT])
    assert {"collect", "file", "http"} <= set(bus.registry.types)
    collect = bus.plan.sinks[1][1]
    assert isinstance(collect, CollectSink)
    async with bus:
        await nc.jetstream().publish(f"mix{unique}.order", b'{"id": 1}')
        await wait_settled(nc, f"MIX_{unique}", f"busway-sink-collect{unique}")
        await wait_settled(nc, f"MIX_{unique}", f"busway-sink-file{unique}")
    assert collect.bodies == [b'{"id": 1}']
    assert (tmp_path / "out.jsonl").read_bytes().splitlines() == [b'{"id": 1}']


def test_bus_takes_adapters_beside_a_decoded_config(unique: str, tmp_path: Path) -> None:
    registry = AdapterRegistry.default().with_adapters(COLLECT)
    config = decode_config(
        f"""
[[streams]]
name = "S_{unique}"
subjects = ["s{unique}.>"]

[[sinks]]
name = "c"
type = "collect"
from = "s{unique}.>"
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )
    bus = Bus(config, adapters=[COLLECT])
    assert isinstance(bus.plan.sinks[0][1], CollectSink)
    assert "file" in bus.registry and "collect" in bus.registry
    assert "collect" not in AdapterRegistry.default(), "with_adapters must not change its source"


def test_a_duplicate_adapter_type_is_an_error_naming_both() -> None:
    mine = Adapter(type="file", sink_config=CollectSinkConfig, create_sink=CollectSink)
    with pytest.raises(ConfigError) as raised:
        AdapterRegistry.default().with_adapters(mine)
    message = str(raised.value)
    assert "adapter type 'file' is registered twice" in message
    assert "tests.test_embedding.CollectSink" in message
    assert "the entry point busway.adapters.file:adapter (installed by busway " in message
    loaded = AdapterRegistry.default()
    assert loaded.sink_config("file") is not None  # the entry point is loaded now
    with pytest.raises(ConfigError, match=r"and by the entry point busway\.adapters\.file:adapter"):
        loaded.with_adapters(mine)

    twin = Adapter(type="collect", sink_config=MemorySinkConfig, create_sink=MemorySink)
    with pytest.raises(ConfigError, match=r"by tests\.test_embedding\.MemorySink and by "):
        AdapterRegistry().with_adapters(COLLECT, twin)
    with pytest.raises(ConfigError, match="registered twice"):
        AdapterRegistry([COLLECT, twin])

    replaced = AdapterRegistry.default()
    replaced.register(mine, replace=True)
    assert replaced["file"] is mine


def test_two_installed_packages_claiming_one_type_fail_only_the_configs_using_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = tmp_path / "impostor-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: impostor\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(
        "[busway.adapters]\nhttp = tests.test_embedding:COLLECT\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = AdapterRegistry.default()
    with pytest.raises(ConfigError) as raised:
        registry.get("http")
    message = str(raised.value)
    assert "adapter type 'http' is provided twice" in message
    assert "busway.adapters.http:adapter (installed by busway " in message
    assert "tests.test_embedding:COLLECT (installed by impostor 1.0)" in message
    assert registry.sink_config("file") is not None


def test_an_adapter_builds_only_from_its_own_config(tmp_path: Path) -> None:
    """The registry holds every adapter as `Adapter[SourceConfig, SinkConfig]`; building checks
    the config's class, so a mixed-up config is a clear error, not a crash inside the sink."""
    config = MemorySinkConfig(name="m", from_="x.>")
    with pytest.raises(
        TypeError, match="builds sinks from CollectSinkConfig, not MemorySinkConfig"
    ):
        COLLECT.build_sink(config, BuildContext(base_dir=tmp_path))
    with pytest.raises(TypeError, match="'collect' provides no source"):
        COLLECT.build_source(
            CountingSourceConfig(name="c", subject="s", count=1), BuildContext(base_dir=tmp_path)
        )


# --- Process-wide decisions belong to the application -------------------------------------


async def test_an_embedded_bus_leaves_the_garbage_collector_alone(
    nats_server: NatsServer, unique: str, tmp_path: Path
) -> None:
    """`gc.freeze()` is process-wide: an application embedding busway decides it, not `Bus`."""
    config = decode_test_config(
        f"""
[nats]
servers = ["{nats_server.url}"]

[[streams]]
name = "GC_{unique}"
subjects = ["gc{unique}.>"]

[[sinks]]
name = "gc{unique}"
type = "file"
from = "gc{unique}.>"
path = "out.jsonl"
""",
        tmp_path,
    )
    gc.unfreeze()
    async with Bus(config):
        assert gc.get_freeze_count() == 0
    assert gc.get_freeze_count() == 0


# Loaded at start-up by the daemon's interpreter (PYTHONPATH): records each gc.freeze() call.
RECORD_FREEZE = r"""
import gc
import importlib
import os

_freeze = gc.freeze


def _recording_freeze():
    _freeze()
    with open(os.environ["BUSWAY_TEST_FREEZE_LOG"], "a") as log:
        log.write(f"{gc.get_freeze_count()}\n")


gc.freeze = _recording_freeze
"""


def test_busway_run_freezes_what_it_allocated_to_start(
    nats_server: NatsServer,
    unique: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    daemons: Daemons,
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(RECORD_FREEZE)
    log = tmp_path / "freeze.log"
    monkeypatch.setenv("BUSWAY_TEST_FREEZE_LOG", str(log))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    )
    path = tmp_path / "busway.toml"
    path.write_text(
        f"""
[nats]
servers = ["{nats_server.url}"]

[http]
listen = "127.0.0.1:{free_port()}"

[[streams]]
name = "RUN_{unique}"
subjects = ["run{unique}.>"]

[[sinks]]
name = "run{unique}"
type = "file"
from = "run{unique}.>"
path = "out.jsonl"
"""
    )
    daemon = daemons.start(path)
    daemon.wait_ready()
    deadline = time.monotonic() + 30
    while not log.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.terminate() == 0
    frozen = [int(line) for line in log.read_text().splitlines()]
    assert len(frozen) == 1 and frozen[0] > 0


# --- docs/embedding.md runs as written ------------------------------------------------------

DOC = REPO / "docs" / "embedding.md"


def test_the_embedding_guide_runs_as_written(tmp_path: Path) -> None:
    """The guide's `app.py` (anyio) and `app_asyncio.py` run as they stand, each with its own
    embedded nats-server on a free port, and print what the guide says they print."""
    text = DOC.read_text()
    files = dict(re.findall(r'```python title="([^"]+)"\n(.*?)```', text, re.DOTALL))
    assert set(files) == {"app.py", "app_asyncio.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    printed = re.search(r"It prints:\n\n```text\n(.*?)```", text, re.DOTALL)
    assert printed is not None

    def run(name: str) -> str:
        result = subprocess.run(
            [sys.executable, name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    assert run("app.py") == printed.group(1)
    assert run("app_asyncio.py") == 'big order: {"total": 500}\nready: True\n'


def test_registering_the_same_adapter_again_changes_nothing() -> None:
    registry = AdapterRegistry([COLLECT])
    registry.register(
        Adapter(type="collect", sink_config=CollectSinkConfig, create_sink=CollectSink)
    )
    registry.register(importlib.import_module("busway.adapters.file").adapter)
    assert registry.types == ["collect", "file"]
