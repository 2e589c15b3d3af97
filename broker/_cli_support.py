"""What the `busway` subcommands share: loading the config they were pointed at."""

from __future__ import annotations

import sys

from busway._config import Config, load_config, locate_in_file
from busway._errors import ConfigError
from busway._plan import Plan, build_plan
from busway._registry import default_registry

__all__ = ["EXIT_CONFIG", "EXIT_FAILURE", "load_or_report", "plan_or_report"]

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def load_or_report(path: str) -> Config | None:
    """The config at `path` with every registered adapter; None after printing why not."""
    registry = default_registry()
    try:
        return load_config(
            path, source_types=registry.source_config, sink_types=registry.sink_config
        )
    except ConfigError as exc:
        exc = locate_in_file(exc, path) if exc.line is None else exc
        print(f"busway: {exc}", file=sys.stderr)
        return None


def plan_or_report(path: str) -> Plan | None:
    """The config at `path` compiled (expressions, adapters), as `busway check` and
    `busway test` need it; None after printing why not."""
    config = load_or_report(path)
    if config is None:
        return None
    try:
        return build_plan(config, default_registry(), file=path)
    except ConfigError as exc:
        exc = locate_in_file(exc, path) if exc.line is None else exc
        print(f"busway: {exc}", file=sys.stderr)
        return None
