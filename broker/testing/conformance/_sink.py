"""`SinkConformance`: the contract every sink adapter keeps, as pytest checks.

The checks drive the sink as the engine does (`open`, `write` batches, `close`) with messages
built here, then ask the case what reached the target, so they see the target's truth rather
than the sink's opinion of it. One check also runs the sink inside a real bus.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import orjson
import pytest

from busway._components import Message, Sink
from busway._config.plan import build_plan
from busway._errors import (
    BatchError,
    ConfigError,
    DeliveryError,
    PermanentError,
    RetryableError,
    StartupError,
)
from busway._registry import Adapter
from busway.testing._harness import eventually, start_bus
from busway.testing.conformance._common import (
    STREAM,
    SUBJECT,
    UNKNOWN_KEY,
    config_text,
    decode,
    expect_once,
    keys,
    registry_for,
)

__all__ = ["SinkCase", "SinkConformance", "json_payload"]

_sequences = itertools.count(1)


def json_payload(key: str) -> bytes:
    """The default body of a check's message: `{"key": "<key>"}`."""
    return orjson.dumps({"key": key})


@dataclass(kw_only=True)
class SinkCase:
    """One sink under test: its config, and how to read what reached its target."""

    type: str
    """The adapter's `type` name."""
    table: str
    """The sink's own TOML keys (everything but `name`, `type` and `from`)."""
    delivered: Callable[[], Awaitable[list[str]]]
    """The keys of the messages found at the target, one entry per copy found there."""
    base_dir: Path
    """Where the config's relative paths start, and where a bus of the checks keeps its store."""
    adapter: Adapter | None = None
    """The adapter, if it is not installed under the `busway.adapters` entry points."""
    idempotent: bool = True
    """The adapter claims that a redelivered message (same `Message.id`) is not written twice."""
    payload: Callable[[str], bytes] = field(default=json_payload)
    """The body of the message carrying a key; `delivered` must find that key again."""
    bad_payload: bytes | None = None
    """A body the target refuses (None: the check of partial failures is skipped)."""
    unreachable_table: str | None = None
    """The sink's TOML keys pointing at a target that does not answer (None: skipped)."""


def _message(case: SinkCase, key: str) -> Message:
    return _raw(key, case.payload(key))


def _raw(key: str, data: bytes) -> Message:
    return Message(
        subject=SUBJECT,
        data=data,
        headers={"Nats-Msg-Id": key},
        id=key,
        stream=STREAM,
        sequence=next(_sequences),
        attempt=1,
    )


def _again(batch: Sequence[Message], attempt: int) -> list[Message]:
    """`batch` as JetStream redelivers it: the same messages, a later attempt."""
    return [replace(message, attempt=attempt) for message in batch]


def _build(case: SinkCase, table: str | None = None) -> Sink:
    registry = registry_for(case.adapter)
    text = config_text(role="sink", type_name=case.type, table=table or case.table)
    config = decode(text, registry, str(case.base_dir))
    return build_plan(config, registry).sinks[0][1]


@contextlib.asynccontextmanager
async def _opened(case: SinkCase) -> AsyncIterator[Sink]:
    sink = _build(case)
    await sink.open()
    try:
        yield sink
    finally:
        await sink.close()


def _errors(error: DeliveryError, size: int) -> dict[int, DeliveryError]:
    """The error of each message of a batch of `size` that failed with `error`."""
    if isinstance(error, BatchError):
        return dict(error.failures)
    return dict.fromkeys(range(size), error)


class SinkConformance:
    """Subclass in a test module and define the `sink_case` fixture; the checks come along.

    class TestMySink(SinkConformance):
        @pytest.fixture
        def sink_case(self, tmp_path: Path) -> SinkCase:
            return SinkCase(type="my", table='url = "..."', delivered=..., base_dir=tmp_path)
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    def anyio_backend(self) -> str:
        """busway runs on asyncio."""
        return "asyncio"

    @pytest.fixture
    def sink_case(self) -> SinkCase:
        """The sink under test: override in the subclass."""
        raise NotImplementedError(f"{type(self).__name__} must define a `sink_case` fixture")

    async def test_writes_every_message_of_a_batch(self, sink_case: SinkCase) -> None:
        wanted = keys(5)
        async with _opened(sink_case) as sink:
            await sink.write([_message(sink_case, key) for key in wanted])
        expect_once(await sink_case.delivered(), wanted, "after one batch, at the target")

    async def test_a_redelivered_batch_is_not_written_twice(self, sink_case: SinkCase) -> None:
        if not sink_case.idempotent:
            pytest.skip("the adapter does not claim idempotent writes (SinkCase.idempotent)")
        wanted = keys(4)
        batch = [_message(sink_case, key) for key in wanted]
        async with _opened(sink_case) as sink:
            await sink.write(batch)
            await sink.write(_again(batch, 2))  # the ack was lost
        async with _opened(sink_case) as sink:  # a restarted daemon, a new sink instance
            await sink.write(_again(batch, 3))
        expect_once(await sink_case.delivered(), wanted, "after redeliveries, at the target")

    async def test_a_replayed_message_is_not_written_twice(self, sink_case: SinkCase) -> None:
        """A replayed dead letter (or a message republished under its id) comes back as a new
        stream message with the same `Message.id`: the id, not the sequence, names it."""
        if not sink_case.idempotent:
            pytest.skip("the adapter does not claim idempotent writes (SinkCase.idempotent)")
        wanted = keys(2)
        batch = [_message(sink_case, key) for key in wanted]
        async with _opened(sink_case) as sink:
            await sink.write(batch)
            await sink.write([replace(message, sequence=next(_sequences)) for message in batch])
        expect_once(await sink_case.delivered(), wanted, "after a replay, at the target")

    async def test_a_failing_message_is_reported_never_swallowed(self, sink_case: SinkCase) -> None:
        if sink_case.bad_payload is None:
            pytest.skip("no body the target refuses (SinkCase.bad_payload)")
        good = keys(2)
        batch = [_message(sink_case, good[0]), _raw(keys(1)[0], sink_case.bad_payload)]
        batch.append(_message(sink_case, good[1]))
        async with _opened(sink_case) as sink:
            with pytest.raises(DeliveryError) as caught:
                await sink.write(batch)
            failures = _errors(caught.value, len(batch))
            assert 1 in failures, f"the refused message is not reported: {caught.value!r}"
            assert set(failures) <= {0, 1, 2}, f"failures beyond the batch: {sorted(failures)}"
            for index, error in failures.items():
                assert isinstance(error, DeliveryError), f"message {index}: {error!r}"
            assert isinstance(failures[1], RetryableError | PermanentError), failures[1]
            # The engine redelivers what was reported failed; the good ones must then arrive.
            retry = [batch[index] for index in (0, 2) if index in failures]
            if retry:
                await sink.write(_again(retry, 2))
        found = await sink_case.delivered()
        where = "after a partly refused batch and its redelivery, at the target"
        expect_once(found if sink_case.idempotent else set(found), good, where)

    async def test_an_unreachable_target_refuses_start_or_fails_retryably(
        self, sink_case: SinkCase
    ) -> None:
        if sink_case.unreachable_table is None:
            pytest.skip("no unreachable target to try (SinkCase.unreachable_table)")
        sink = _build(sink_case, sink_case.unreachable_table)
        try:
            await sink.open()
        except StartupError as exc:
            refusal: StartupError | None = exc
        else:
            refusal = None
        if refusal is not None:
            assert str(refusal).strip(), "a StartupError must say what is wrong"
            await sink.close()  # the engine may close what failed to open
            return
        try:
            batch = [_message(sink_case, key) for key in keys(2)]
            with pytest.raises(DeliveryError) as caught:
                await sink.write(batch)
            failures = _errors(caught.value, len(batch))
            assert sorted(failures) == [0, 1], f"every message must fail: {caught.value!r}"
            for error in failures.values():
                assert isinstance(error, RetryableError), f"an outage is transient: {error!r}"
                assert str(error).strip(), f"an error must say what is wrong: {error!r}"
            assert not sink.ready(), "ready() must be false while the target does not answer"
        finally:
            await sink.close()

    async def test_close_twice_is_harmless(self, sink_case: SinkCase) -> None:
        [key] = keys(1)
        sink = _build(sink_case)
        await sink.open()
        await sink.write([_message(sink_case, key)])
        await sink.close()
        await sink.close()
        expect_once(await sink_case.delivered(), [key], "after close() twice, at the target")

    async def test_an_unknown_key_is_refused_by_name(self, sink_case: SinkCase) -> None:
        registry = registry_for(sink_case.adapter)
        text = config_text(
            role="sink", type_name=sink_case.type, table=sink_case.table, unknown_key=True
        )
        with pytest.raises(ConfigError) as caught:
            decode(text, registry, str(sink_case.base_dir))
        assert UNKNOWN_KEY in str(caught.value), f"the error does not name it: {caught.value}"

    async def test_delivers_through_a_running_bus(self, sink_case: SinkCase) -> None:
        wanted = keys(3)
        text = config_text(role="sink", type_name=sink_case.type, table=sink_case.table)
        adapters = [sink_case.adapter] if sink_case.adapter is not None else []
        async with start_bus(text, adapters=adapters, directory=sink_case.base_dir) as harness:
            for key in wanted:
                await harness.publish(SUBJECT, sink_case.payload(key), id=key)

            async def all_delivered() -> bool:
                return sorted(await sink_case.delivered()) == sorted(wanted)

            await eventually(all_delivered, timeout=30)
