"""What the sink and source checks share: the config around the adapter under test."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable

from busway._config.model import Config, decode_config
from busway._registry import Adapter, AdapterRegistry
from busway.testing._harness import harness_registry

__all__ = [
    "COMPONENT",
    "STREAM",
    "SUBJECT",
    "UNKNOWN_KEY",
    "config_text",
    "decode",
    "expect_once",
    "keys",
    "registry_for",
]

STREAM = "CONFORMANCE"
SUBJECT = "conformance.in"
COMPONENT = "conformance"
UNKNOWN_KEY = "no_such_conformance_key"
"""A key no adapter has: every adapter must refuse it, naming it."""


def keys(count: int) -> list[str]:
    """`count` keys unique to this call, so checks never see each other's messages."""
    token = uuid.uuid4().hex[:8]
    return [f"k{token}-{i}" for i in range(count)]


def registry_for(adapter: Adapter | None) -> AdapterRegistry:
    """The installed adapters and `memory`, plus the adapter under test if it is not installed."""
    return harness_registry([adapter] if adapter is not None else [])


def config_text(
    *, role: str, type_name: str, table: str, unknown_key: bool = False, extra: str = ""
) -> str:
    """A whole config with one stream and the component under test (its keys in `table`).

    `role` is "sink" or "source". The unknown key goes first in the component's table, so
    that it lands there whatever sub-tables `table` opens.
    """
    head = f'from = "{SUBJECT}"' if role == "sink" else f'subject = "{SUBJECT}"'
    unknown = f"{UNKNOWN_KEY} = 1\n" if unknown_key else ""
    return (
        f"{extra}\n"
        f'[[streams]]\nname = "{STREAM}"\nsubjects = ["conformance.>"]\n\n'
        f'[[{role}s]]\nname = "{COMPONENT}"\ntype = "{type_name}"\n{head}\n{unknown}{table}\n'
    )


def decode(text: str, registry: AdapterRegistry, base_dir: str) -> Config:
    """`text` decoded as busway decodes a config file (ConfigError names key and line)."""
    return decode_config(
        text,
        file="conformance.toml",
        base_dir=base_dir,
        source_types=registry.source_config,
        sink_types=registry.sink_config,
    )


def expect_once(found: Iterable[str], wanted: Iterable[str], where: str) -> None:
    """AssertionError, saying what is missing and what is extra, unless `found` holds each of
    `wanted` exactly once. (The installed package's asserts are not rewritten by pytest: the
    message must say it all.)"""
    have, want = Counter(found), Counter(wanted)
    if have == want:
        return
    missing = sorted((want - have).elements())
    extra = sorted((have - want).elements())
    raise AssertionError(
        f"{where}: expected each of {sorted(want)} once; missing {missing}, "
        f"extra or duplicated {extra}"
    )
