"""What the `busway` subcommands share: loading the config they were pointed at."""

from __future__ import annotations

import sys

from busway._config import Config, load_config, locate_in_file
from busway._errors import ConfigError
from busway._plan import Plan, build_plan
from busway._registry import default_registry

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "EXIT_STARTUP", "load_or_report", "plan_or_report"]

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 2
"""`busway run` could not start: like a bad config, it needs a fix, not a retry loop."""


def load_or_report(path: str) -> Config | None:
    """The config at `path` as operator commands (`status`, `reload`, `dlq`) need it: every
    section, and each component's name, subjects and consumer settings, but not adapters' own
    keys or route logic, whose `${...}` secrets stay unresolved (see `decode_config`'s
    `outline`); None after printing why not."""
    return _load(path, outline=True)


def _load(path: str, *, outline: bool) -> Config | None:
    registry = default_registry()
    try:
        return load_config(
            path,
            source_types=registry.source_config,
            sink_types=registry.sink_config,
            outline=outline,
        )
    except ConfigError as exc:
        exc = locate_in_file(exc, path) if exc.line is None else exc
        print(f"busway: {exc}", file=sys.stderr)
        return None


def plan_or_report(path: str) -> Plan | None:
    """The config at `path` in full and compiled (expressions, adapters), as `busway check`
    and `busway test` need it; None after printing why not."""
    config = _load(path, outline=False)
    if config is None:
        return None
    try:
        return build_plan(config, default_registry(), file=path)
    except ConfigError as exc:
        exc = locate_in_file(exc, path) if exc.line is None else exc
        print(f"busway: {exc}", file=sys.stderr)
        return None
