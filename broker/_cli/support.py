"""What the `busway` subcommands share: loading the config they were pointed at, and saying
in one line why not."""

from __future__ import annotations

import re
import sys

from busway._config.model import Config, load_config, locate_in_file
from busway._config.plan import Plan, build_plan
from busway._errors import ConfigError
from busway._registry import default_registry

__all__ = [
    "EXIT_CONFIG",
    "EXIT_FAILURE",
    "EXIT_STARTUP",
    "load_or_report",
    "one_line",
    "plan_or_report",
    "report_config_error",
]

EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_STARTUP = 2
"""`busway run` could not start: like a bad config, it needs a fix, not a retry loop."""

_MAX_LINE = 1000
# An expression error's caret display (`\n  a ==\n      ^`): the first line already names the
# position, and an error must stay on one line for logs and scripts.
_CARET = re.compile(r"\n  [^\n]*\n *\^ *$")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


def one_line(text: str) -> str:
    """`text` as one printable line: no caret display, control characters escaped, and cut to
    1000 characters (an error may quote a value of any size)."""
    text = _CARET.sub("", text)
    text = re.sub(r"\s*\n\s*", " ", text.strip())
    text = _UNPRINTABLE.sub(lambda found: repr(found.group(0))[1:-1], text)
    return text if len(text) <= _MAX_LINE else text[: _MAX_LINE - 1] + "…"


def report_config_error(error: ConfigError, path: str) -> None:
    """Print `error` as one `busway: file:line at key: what` line on stderr."""
    error = locate_in_file(error, path) if error.line is None and error.path else error
    print(f"busway: {one_line(str(error))}", file=sys.stderr)


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
        report_config_error(exc, path)
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
        report_config_error(exc, path)
        return None
