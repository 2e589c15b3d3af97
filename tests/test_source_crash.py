"""A source that raises after it started never takes the daemon down: it is restarted.

Real NATS and real HTTP; the crashing source is an application's own adapter registered in the
test (first test), and the real `file` source meeting a file name that is not UTF-8 (second).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import anyio
import orjson
import pytest
from anyio.abc import TaskStatus
from nats.aio.client import Client as NatsClient
from prometheus_client import generate_latest

from busway import (
    Adapter,
    AdapterRegistry,
    BuildContext,
    Bus,
    Config,
    Source,
    SourceConfig,
    SourceContext,
    StartupError,
    decode_config,
    default_registry,
)
from tests.configs import config_toml, stream_table
from tests.files_support import jsonl, source_config
from tests.support import NatsServer, decode_test_config, eventually, readyz, stream_messages

pytestmark = pytest.mark.anyio


class CrashySourceConfig(SourceConfig, tag="crashy", frozen=True, kw_only=True):
    """Publishes `count` numbered messages; its first run raises after `crash_after` of them."""

    count: int = 10
    crash_after: int = 5
    fail_start: bool = False


class CrashySource(Source):
    """Crashes once mid-way; the restarted run waits for `resume`, then publishes them all.

    Its ids are deterministic (`crashy:<n>`), as a real source's are, so what the crashed run
    had already stored is a duplicate JetStream drops when the restarted run sends it again.
    """

    def __init__(self, config: CrashySourceConfig, context: BuildContext) -> None:
        self.config = config
        self.runs = 0
        self.resume = anyio.Event()

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        self.runs += 1
        if self.config.fail_start:
            raise StartupError(f"source {context.name!r}: bad credentials")
        if self.runs > 1:
            await self.resume.wait()  # lets the test see the source down before it is back
        task_status.started()
        last = self.config.crash_after if self.runs == 1 else self.config.count
        for n in range(1, last + 1):
            await context.publisher.publish(
                self.config.subject,
                orjson.dumps({"n": n}),
                headers={"Nats-Msg-Id": f"crashy:{n}"},
            )
            context.stats.published += 1
        if self.runs == 1:
            raise RuntimeError("the peer sent something this adapter did not foresee")
        await anyio.sleep_forever()


def crashy_registry() -> AdapterRegistry:
    registry = default_registry()
    registry.register(
        Adapter(type="crashy", source_config=CrashySourceConfig, create_source=CrashySource)
    )
    return registry


def crashy_config(
    server: NatsServer, unique: str, registry: AdapterRegistry, extra: str = ""
) -> Config:
    return decode_config(
        config_toml(server, streams=[stream_table(f"CR_{unique}", f"cr{unique}.>")])
        + f"""
[[sources]]
name = "crashy{unique}"
type = "crashy"
subject = "cr{unique}.crashy"
{extra}

[[routes]]
name = "beside{unique}"
from = "cr{unique}.in"
to = ["cr{unique}.out"]
""",
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )


def drop_non_utf8_name(inbox: Path) -> None:
    """A complete JSONL file named `bad<0xff>.jsonl`: legal on Linux, not UTF-8."""
    with open(os.fsencode(inbox) + b"/bad\xff.jsonl", "wb") as bad:
        bad.write(jsonl(3))


def subjects(messages: list[object], subject: str) -> list[object]:
    return [m for m in messages if getattr(m, "subject", None) == subject]


async def test_a_source_crashing_after_start_is_restarted_and_the_rest_keeps_running(
    nats_server: NatsServer,
    nc: NatsClient,
    unique: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = crashy_registry()
    config = crashy_config(nats_server, unique, registry)
    bus = Bus(config, registry=registry)
    source = bus.plan.sources[0][1]
    assert isinstance(source, CrashySource)
    check = f"source:crashy{unique}"
    js = nc.jetstream()
    caplog.set_level(logging.INFO, logger="busway")
    async with bus:

        async def down() -> bool:
            return (await readyz(bus)).status_code == 503 and source.runs == 2

        await eventually(down)
        body = (await readyz(bus)).json()
        assert body["checks"][check] is False
        assert body["reasons"][check].startswith("crashed (1 time(s))")
        assert "RuntimeError" not in body["reasons"][check]  # no internals to anonymous callers
        assert (await bus.status()).not_ready == {check: body["reasons"][check]}
        stats = next(s for s in bus.metrics.stats if s.name == f"crashy{unique}")
        assert stats.errors == {"source_crashed": 1}
        assert stats.last_error.startswith("crashed: RuntimeError: the peer sent something")
        metrics = generate_latest(bus.metrics_registry).decode()
        assert f'busway_errors_total{{component="crashy{unique}",kind="source",' in metrics
        assert 'reason="source_crashed"} 1.0' in metrics

        # The route beside it keeps flowing while the source is down.
        for n in range(3):
            await js.publish(f"cr{unique}.in", orjson.dumps({"n": n}))

        async def routed() -> bool:
            outs = subjects(await stream_messages(nc, f"CR_{unique}"), f"cr{unique}.out")
            return len(outs) == 3

        await eventually(routed)
        assert (await readyz(bus)).status_code == 503

        source.resume.set()

        async def ready_again() -> bool:
            return (await readyz(bus)).status_code == 200

        await eventually(ready_again)

        async def all_published() -> bool:
            return stats.published == 15  # 5 before the crash, all 10 again after it

        await eventually(all_published)

    crash_lines = [r for r in caplog.records if "crashed" in r.getMessage()]
    assert len(crash_lines) == 1
    assert crash_lines[0].levelno == logging.ERROR
    assert crash_lines[0].getMessage() == (
        f"source 'crashy{unique}' crashed: RuntimeError: the peer sent something this adapter "
        "did not foresee; restarting in 1s"
    )
    assert crash_lines[0].exc_info is None  # the traceback is logged at debug level only
    stored = subjects(await stream_messages(nc, f"CR_{unique}"), f"cr{unique}.crashy")
    assert sorted(orjson.loads(m.data)["n"] for m in stored) == list(range(1, 11))  # type: ignore[attr-defined]


async def test_a_source_failing_before_it_started_still_fails_start_up(
    nats_server: NatsServer, unique: str
) -> None:
    registry = crashy_registry()
    config = crashy_config(nats_server, unique, registry, extra="fail_start = true")
    with pytest.raises(StartupError, match="bad credentials"):
        async with Bus(config, registry=registry):
            pass


async def test_the_file_source_meeting_a_non_utf8_file_name_does_not_stop_the_daemon(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """A name that is not UTF-8 cannot go into a NATS header (and watchfiles cannot decode it).
    It once crashed the file source's run loop (restarted with back-off); now the file goes to
    `failed/` with its reason, the source stays up and ready, and the route beside it flows."""
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    drop_non_utf8_name(inbox)
    text = source_config(nats_server, unique, inbox, options='ready = "rename"')
    text += f"""
[[routes]]
name = "beside{unique}"
from = "in{unique}.orders"
to = ["in{unique}.routed"]
"""
    config = decode_test_config(text, tmp_path)
    check = f"source:inbox{unique}"
    failed = os.fsencode(inbox / "failed")
    async with Bus(config) as bus:
        stats = next(s for s in bus.metrics.stats if s.kind == "source")

        async def set_aside() -> bool:
            names = await anyio.to_thread.run_sync(
                lambda: os.listdir(failed) if os.path.isdir(failed) else []
            )
            return b"bad\xff.jsonl" in names

        await eventually(set_aside)
        await nc.jetstream().publish(f"in{unique}.orders", b'{"n": 1}')

        async def routed() -> bool:
            messages = await stream_messages(nc, f"IN_{unique}")
            return len(subjects(messages, f"in{unique}.routed")) == 1

        await eventually(routed)
        assert stats.errors.get("source_crashed", 0) == 0
        body = (await readyz(bus)).json()
        assert body["checks"][check] is True
        assert not bus.stopping
