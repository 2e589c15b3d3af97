"""`SourceConformance`: the contract every source adapter keeps, as pytest checks.

Sources are checked inside a real bus (`start_bus`): what counts is what JetStream stored.
The case feeds inputs carrying keys; the checks read the stream back and find the keys again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from busway._components import Message
from busway._errors import ConfigError
from busway._registry import Adapter
from busway.testing._harness import Harness, eventually, start_bus
from busway.testing.conformance._common import (
    COMPONENT,
    STREAM,
    UNKNOWN_KEY,
    config_text,
    decode,
    expect_once,
    keys,
    registry_for,
)

__all__ = ["SourceCase", "SourceConformance", "json_key"]

Feed = Callable[[Harness, list[str]], Awaitable[None]]


def json_key(message: Message) -> str:
    """The default way to find a message's key: the `key` field of its JSON body."""
    body: Any = orjson.loads(message.data)
    return str(body["key"])


@dataclass(kw_only=True)
class SourceCase:
    """One source under test: its config, and how to put inputs where it reads them."""

    type: str
    """The adapter's `type` name."""
    table: str
    """The source's own TOML keys (everything but `name`, `type` and `subject`)."""
    feed: Feed
    """Puts one input per key where the source reads it (called while the bus runs)."""
    directory: Path
    """Where the bus keeps its store and the config's relative paths start."""
    refeed: Feed | None = None
    """Puts the *same* inputs back as a source would meet them again after a crash before it
    recorded its progress (default: `feed` again)."""
    consumed: Callable[[Harness, list[str]], Awaitable[bool]] | None = None
    """True once the source has taken every input (default: its `published` count)."""
    key_of: Callable[[Message], str] = field(default=json_key)
    """A stored message's key."""
    adapter: Adapter | None = None
    """The adapter, if it is not installed under the `busway.adapters` entry points."""
    extra: str = ""
    """More TOML before the streams (e.g. an `[http]` table)."""


def _text(case: SourceCase, *, head: str = "", unknown_key: bool = False) -> str:
    return head + config_text(
        role="source",
        type_name=case.type,
        table=case.table,
        unknown_key=unknown_key,
        extra=case.extra,
    )


class SourceConformance:
    """Subclass in a test module and define the `source_case` fixture; the checks come along."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [pytest.mark.anyio]

    @pytest.fixture
    def anyio_backend(self) -> str:
        """busway runs on asyncio."""
        return "asyncio"

    @pytest.fixture
    def source_case(self) -> SourceCase:
        """The source under test: override in the subclass."""
        raise NotImplementedError(f"{type(self).__name__} must define a `source_case` fixture")

    async def test_publishes_each_input_once_with_ids_naming_the_source(
        self, source_case: SourceCase
    ) -> None:
        wanted = keys(3)
        adapters = [source_case.adapter] if source_case.adapter is not None else []
        # Inputs arrive the moment the bus is up: a source is ready when it said started().
        async with (
            start_bus(
                _text(source_case), adapters=adapters, directory=source_case.directory
            ) as harness,
            harness.collect("conformance.>") as got,
        ):
            await source_case.feed(harness, wanted)
            stored = await got.wait(len(wanted), timeout=30)
        expect_once((source_case.key_of(m) for m in stored), wanted, "stored on the stream")
        ids = [message.id for message in stored]
        assert len(set(ids)) == len(ids), f"two inputs share a message id: {ids}"
        for message in stored:
            assert message.headers.get("Nats-Msg-Id") == message.id, (
                f"published without a Nats-Msg-Id: {message.id}"
            )
            assert message.id.startswith(f"{COMPONENT}:"), (
                f"message id {message.id!r} does not name the source {COMPONENT!r}"
            )

    async def test_the_same_input_twice_stores_nothing_twice(self, source_case: SourceCase) -> None:
        wanted = keys(3)
        adapters = [source_case.adapter] if source_case.adapter is not None else []
        async with (
            start_bus(
                _text(source_case), adapters=adapters, directory=source_case.directory
            ) as harness,
            harness.collect("conformance.>") as got,
        ):
            await source_case.feed(harness, wanted)
            first = await got.wait(len(wanted), timeout=30)
        # The same store (JetStream remembers the ids), but the source's own state forgotten:
        # it meets every input again, as after a crash before it recorded its progress.
        rerun = 'state_bucket = "conformance_rerun"\n'
        async with start_bus(
            _text(source_case, head=rerun), adapters=adapters, directory=source_case.directory
        ) as harness:
            await (source_case.refeed or source_case.feed)(harness, wanted)

            async def consumed() -> bool:
                if source_case.consumed is not None:
                    return await source_case.consumed(harness, wanted)
                return harness.stats(COMPONENT).published >= len(wanted)

            await eventually(consumed, timeout=30)
            stored = await harness.stored(STREAM)
        expect_once(
            (m.id for m in stored),
            (m.id for m in first),
            "message ids stored after the same input came twice",
        )
        expect_once((source_case.key_of(m) for m in stored), wanted, "stored on the stream")

    async def test_an_unknown_key_is_refused_by_name(self, source_case: SourceCase) -> None:
        registry = registry_for(source_case.adapter)
        with pytest.raises(ConfigError) as caught:
            decode(_text(source_case, unknown_key=True), registry, str(source_case.directory))
        assert UNKNOWN_KEY in str(caught.value), f"the error does not name it: {caught.value}"
