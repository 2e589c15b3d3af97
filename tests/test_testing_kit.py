"""busway.testing: the harness an application tests its routes with, and the conformance suite's
own honesty (it must fail adapters that break the contract, not only pass good ones).

Everything runs on real embedded nats-servers that the harness starts on free ports.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.abc import TaskStatus

from busway import (
    Adapter,
    BuildContext,
    Message,
    PermanentError,
    PublishAck,
    RetryableError,
    Sink,
    SinkConfig,
    Source,
    SourceConfig,
    SourceContext,
    decode_config,
    default_registry,
)
from busway.testing import (
    Harness,
    MemoryHub,
    MemorySource,
    MemorySourceConfig,
    eventually,
    harness_registry,
    start_bus,
)
from busway.testing.conformance import SinkCase, SinkConformance, SourceCase, SourceConformance

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]

ROUTED = """
[[streams]]
name = "ORDERS"
subjects = ["orders.>"]

[[routes]]
name = "big"
from = "orders.new"
when = "total > `100`"
to = ["orders.big"]

[[sinks]]
name = "crm"
type = "memory"
from = "orders.big"
retry = { backoff = "10ms", max_backoff = "50ms", max_attempts = 3 }

[[sources]]
name = "shop"
type = "memory"
subject = "orders.new"
"""


async def test_a_route_is_tested_by_publishing_and_collecting_what_was_stored() -> None:
    async with start_bus(ROUTED) as harness:
        async with harness.collect("orders.big") as got:
            await harness.publish("orders.new", {"total": 250}, id="o-1")
            await harness.publish("orders.new", {"total": 5}, id="o-2")  # filtered
            await harness.publish("orders.new", {"total": 300}, id="o-3")
            await got.wait(2)
        assert got.bodies() == [{"total": 250}, {"total": 300}]
        stored = await harness.stored("ORDERS")
        assert [m.subject for m in stored].count("orders.big") == 2  # nothing else came later
        delivered = await harness.sink("crm").wait(2)
        assert [orjson_body(m) for m in delivered] == [{"total": 250}, {"total": 300}]


def orjson_body(message: Message) -> Any:
    return msgspec.json.decode(message.data)


async def test_the_memory_sink_fails_as_told_and_the_engine_retries_or_dead_letters() -> None:
    config = ROUTED.replace('from = "orders.big"', 'from = "orders.direct"')
    async with start_bus(config) as harness:
        crm = harness.sink("crm")
        crm.fail_transiently("flaky", retry_after=0.01)
        crm.fail_permanently("refused")
        async with harness.collect("busway.deadletter.>") as dead:
            for name in ("ok", "flaky", "refused"):
                await harness.publish("orders.direct", {"name": name}, id=name)
            [dead_letter] = await dead.wait(1)
            delivered = await crm.wait(2)
        assert sorted(m.id for m in delivered) == ["flaky", "ok"]
        assert next(m.attempt for m in delivered if m.id == "flaky") == 2
        assert dead_letter.headers["Busway-Original-Msg-Id"] == "refused"
        assert dead_letter.headers["Busway-Component"] == "crm"
        assert "refused (test)" in dead_letter.headers["Busway-Error"]
        assert "refused" not in crm.ids


async def test_the_memory_source_stores_a_repeated_id_once_under_the_source_name() -> None:
    async with start_bus(ROUTED) as harness:
        shop = harness.source("shop")
        first = await shop.push({"total": 1}, id="cart-7")
        again = await shop.push({"total": 1}, id="cart-7")
        assert (first.duplicate, again.duplicate) == (False, True)
        [stored] = [m for m in await harness.stored("ORDERS") if m.subject == "orders.new"]
        assert stored.id == "shop:cart-7"
        assert harness.stats("shop").published == 2


async def test_two_harnesses_run_side_by_side_and_leave_the_default_registry_alone() -> None:
    async with start_bus(ROUTED) as one, start_bus(ROUTED) as two:
        assert one.nats_url != two.nats_url
        assert one.http_url != two.http_url
        await one.publish("orders.new", {"total": 500}, id="only-in-one")
        await one.sink("crm").wait(1)
        assert [m.subject for m in await two.stored("ORDERS")] == []
        assert one.sink("crm") is not two.sink("crm")
    assert "memory" not in default_registry()


async def test_a_bus_restarted_on_its_directory_keeps_what_was_stored(tmp_path: Path) -> None:
    async with start_bus(ROUTED, directory=tmp_path) as harness:
        await harness.publish("orders.new", {"total": 1}, id="kept")
    async with start_bus(ROUTED, directory=tmp_path) as harness:
        assert [m.id for m in await harness.stored("ORDERS")] == ["kept"]
        duplicate = await harness.publish("orders.new", {"total": 1}, id="kept")
        assert duplicate.duplicate


async def test_a_config_object_works_as_well_as_toml_text(tmp_path: Path) -> None:
    registry = harness_registry()
    config = decode_config(
        ROUTED, base_dir=str(tmp_path), source_types=registry.source_config,
        sink_types=registry.sink_config,
    )  # fmt: skip
    async with start_bus(config) as harness:
        await harness.source("shop").push({"total": 999}, id="big-one")
        [delivered] = await harness.sink("crm").wait(1)
        assert orjson_body(delivered) == {"total": 999}


async def test_collecting_a_subject_no_stream_captures_says_so() -> None:
    async with start_bus(ROUTED) as harness:
        with pytest.raises(ValueError, match=r"no stream captures 'nowhere\.>'"):
            async with harness.collect("nowhere.>"):
                pass


async def test_an_assertion_failing_inside_the_block_comes_out_as_itself() -> None:
    with pytest.raises(AssertionError, match="the test's own words"):
        async with start_bus(ROUTED):
            raise AssertionError("the test's own words")


async def test_a_wait_that_times_out_says_how_many_came() -> None:
    async with start_bus(ROUTED) as harness, harness.collect("orders.big") as got:
        await harness.publish("orders.new", {"total": 200}, id="one")
        with pytest.raises(TimeoutError, match=r"1 of 2 within 0\.5s"):
            await got.wait(2, timeout=0.5)


def test_the_harness_runs_under_plain_asyncio() -> None:
    async def main() -> list[Any]:
        async with start_bus(ROUTED) as harness:
            await harness.source("shop").push({"total": 150}, id="plain-asyncio")
            return [orjson_body(m) for m in await harness.sink("crm").wait(1)]

    assert asyncio.run(main()) == [{"total": 150}]


# --------------------------------------------- the conformance suite must fail broken adapters


class BrokenSinkConfig(SinkConfig, tag="broken", frozen=True, kw_only=True):
    """A sink that breaks the contract in the way `how` says."""

    how: str


class BrokenSink(Sink):
    """Writes into `target`; `how` picks the contract it breaks."""

    target: list[str] = []  # noqa: RUF012 - shared on purpose: the case reads it back

    def __init__(self, config: BrokenSinkConfig, context: BuildContext) -> None:
        self.how = config.how

    async def write(self, batch: Sequence[Message]) -> None:
        if self.how == "outage-is-permanent":
            raise PermanentError("target down")
        for message in batch:
            body = msgspec.json.decode(message.data)
            if "key" not in body:
                if self.how == "swallows":
                    continue  # silently dropped: the engine would ack it
                raise RetryableError("refused")
            if self.how == "duplicates" or message.id not in self.target:
                self.target.append(str(body["key"]))

    def ready(self) -> bool:
        return True


BROKEN_SINK = Adapter(type="broken", sink_config=BrokenSinkConfig, create_sink=BrokenSink)


def broken_sink_case(how: str, tmp_path: Path, *, unreachable: str | None = None) -> SinkCase:
    BrokenSink.target = []

    async def delivered() -> list[str]:
        return list(BrokenSink.target)

    return SinkCase(
        type="broken",
        table=f'how = "{how}"',
        delivered=delivered,
        base_dir=tmp_path,
        adapter=BROKEN_SINK,
        bad_payload=b'{"no_key_here": 1}',
        unreachable_table=unreachable,
    )


async def test_the_suite_fails_a_sink_that_swallows_a_failure(tmp_path: Path) -> None:
    case = broken_sink_case("swallows", tmp_path)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        await SinkConformance().test_a_failing_message_is_reported_never_swallowed(case)


async def test_the_suite_fails_a_sink_that_claims_idempotency_and_duplicates(
    tmp_path: Path,
) -> None:
    case = broken_sink_case("duplicates", tmp_path)
    with pytest.raises(AssertionError, match=r"extra or duplicated \['k"):
        await SinkConformance().test_a_redelivered_batch_is_not_written_twice(case)


async def test_the_suite_fails_a_sink_that_dead_letters_during_an_outage(tmp_path: Path) -> None:
    case = broken_sink_case(
        "keeps-the-contract", tmp_path, unreachable='how = "outage-is-permanent"'
    )
    with pytest.raises(AssertionError, match="an outage is transient"):
        await SinkConformance().test_an_unreachable_target_refuses_start_or_fails_retryably(case)


async def test_the_suite_passes_the_same_sink_when_it_keeps_the_contract(tmp_path: Path) -> None:
    suite = SinkConformance()
    await suite.test_a_redelivered_batch_is_not_written_twice(
        broken_sink_case("keeps-the-contract", tmp_path)
    )
    await suite.test_a_failing_message_is_reported_never_swallowed(
        broken_sink_case("keeps-the-contract", tmp_path)
    )


class RandomIdSource(MemorySource):
    """Publishes each push under a new random id, ignoring the input's identity."""

    async def push(
        self,
        body: bytes | str | Any,
        *,
        id: str | None = None,
        headers: Mapping[str, str] | None = None,
        subject: str | None = None,
    ) -> PublishAck:
        return await super().push(body, id=uuid.uuid4().hex, headers=headers, subject=subject)


class EagerSource(MemorySource):
    """Says started() before it takes input (it gets ready a moment later)."""

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        task_status.started()
        await anyio.sleep(2)
        await super().run(context, task_status=anyio.TASK_STATUS_IGNORED)


class AnonymousSource(Source):
    """Publishes under ids that do not name the source."""

    def __init__(self, config: SourceConfig, context: BuildContext) -> None:
        self.config = config
        self.context: SourceContext | None = None

    async def run(self, context: SourceContext, *, task_status: TaskStatus[None]) -> None:
        self.context = context
        task_status.started()
        await anyio.sleep_forever()


class RandomIdConfig(MemorySourceConfig, tag="random-id", frozen=True, kw_only=True):
    """The config of `RandomIdSource`."""


class EagerConfig(MemorySourceConfig, tag="eager", frozen=True, kw_only=True):
    """The config of `EagerSource`."""


class AnonymousConfig(SourceConfig, tag="anonymous", frozen=True, kw_only=True):
    """The config of `AnonymousSource`."""


def source_case(adapter: Adapter, built: dict[str, Any], tmp_path: Path) -> SourceCase:
    async def feed(harness: Harness, keys: list[str]) -> None:
        source = built["source"]
        for key in keys:
            if isinstance(source, MemorySource):
                await source.push({"key": key}, id=key)
            else:
                assert source.context is not None
                await source.context.publisher.publish(
                    "conformance.in",
                    msgspec.json.encode({"key": key}),
                    headers={"Nats-Msg-Id": f"input-{key}"},
                )
                source.context.stats.published += 1

    return SourceCase(type=adapter.type, table="", feed=feed, directory=tmp_path, adapter=adapter)


async def test_the_suite_fails_a_source_whose_ids_change_between_runs(tmp_path: Path) -> None:
    built: dict[str, Any] = {}

    def create(config: RandomIdConfig, context: BuildContext) -> RandomIdSource:
        built["source"] = RandomIdSource(config, context)
        return built["source"]  # type: ignore[no-any-return]

    adapter = Adapter(type="random-id", source_config=RandomIdConfig, create_source=create)
    case = source_case(adapter, built, tmp_path)
    with pytest.raises(AssertionError, match="message ids stored after the same input came twice"):
        await SourceConformance().test_the_same_input_twice_stores_nothing_twice(case)


async def test_the_suite_fails_a_source_that_says_started_before_it_is_ready(
    tmp_path: Path,
) -> None:
    built: dict[str, Any] = {}

    def create(config: EagerConfig, context: BuildContext) -> EagerSource:
        built["source"] = EagerSource(config, context)
        return built["source"]  # type: ignore[no-any-return]

    adapter = Adapter(type="eager", source_config=EagerConfig, create_source=create)
    case = source_case(adapter, built, tmp_path)
    with pytest.raises(RuntimeError, match="is not running"):
        await SourceConformance().test_publishes_each_input_once_with_ids_naming_the_source(case)


async def test_the_suite_fails_a_source_whose_ids_do_not_name_it(tmp_path: Path) -> None:
    built: dict[str, Any] = {}

    def create(config: AnonymousConfig, context: BuildContext) -> AnonymousSource:
        built["source"] = AnonymousSource(config, context)
        return built["source"]  # type: ignore[no-any-return]

    adapter = Adapter(type="anonymous", source_config=AnonymousConfig, create_source=create)
    case = source_case(adapter, built, tmp_path)
    with pytest.raises(AssertionError, match="does not name the source"):
        await SourceConformance().test_publishes_each_input_once_with_ids_naming_the_source(case)


# ---------------------------------------------------------------------------- the docs example


def test_the_docs_example_runs_as_a_test_module(tmp_path: Path) -> None:
    """docs/testing.md's example module, run by pytest as a user would run it."""
    text = (REPO / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    example = next(block for block in blocks if block.startswith("# test_orders.py"))
    (tmp_path / "test_orders.py").write_text(example)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "-W", "error", "test_orders.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    # The route test and eight sink checks; the unreachable-target check has no case there.
    assert re.search(r"\b8 passed, 1 skipped\b", done.stdout), done.stdout


async def test_memory_hub_keeps_instances_apart_per_harness() -> None:
    hub = MemoryHub()
    registry = harness_registry(hub=hub)
    assert "memory" in registry and "file" in registry
    config = decode_config(
        ROUTED, source_types=registry.source_config, sink_types=registry.sink_config
    )
    adapter = registry["memory"]
    assert adapter.create_sink is not None
    adapter.create_sink(config.sinks[0], BuildContext(base_dir=Path()))
    assert list(hub.sinks) == ["crm"]


async def test_eventually_reports_the_condition_it_waited_for() -> None:
    async def never() -> bool:
        return False

    with pytest.raises(TimeoutError, match=r"never not met within 0\.1s"):
        await eventually(never, timeout=0.1)


def test_the_public_names_are_sorted_and_all_exported() -> None:
    import busway.testing
    import busway.testing.conformance

    for module in (busway.testing, busway.testing.conformance):
        assert module.__all__ == sorted(module.__all__)
        public = {name for name in vars(module) if not name.startswith("_")}
        assert public - {"annotations"} <= set(module.__all__) | {"conformance"}
        assert all(hasattr(module, name) for name in module.__all__)
