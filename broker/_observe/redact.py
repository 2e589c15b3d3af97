"""Masking of everything busway shows: log lines, dead-letter reasons, `/status`, `busway dlq`.

The `[redaction]` table's rules (`busway.routers.dlp`) are made active for the process while a
bus runs (`redaction(config.redaction)`), or for an operator command. Then:

* every log record is masked when it is created, before any handler sees it (stderr, JSON,
  pytest's caplog, a handler an embedding application added), by a log-record factory that
  wraps whatever factory was installed before;
* `redact(text)` masks a string busway is about to store or print: the `Busway-Error` of a
  dead letter, a component's last error in `/status`, `busway dlq show` and `dlq list`.

Dead letters keep their bodies untouched, so a replay sends the original; it is the display of
them that is masked. The rules are active process-wide because logging is process-wide; with
several buses in one process, the one started last decides until it stops.

This module is pure (no NATS), and cheap when nothing is active: one global read per call.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from busway.routers.dlp import Dlp
from busway.routers.stages import DlpRules

__all__ = ["active_rules", "install_redaction", "redact", "redaction"]

_active: Dlp | None = None
_factory_installed = False


def redact(text: str) -> str:
    """`text` with the active rules' matches masked (unchanged when no rules are active)."""
    dlp = _active
    if dlp is None or not text:
        return text
    return dlp.mask_text(text)


def active_rules() -> Dlp | None:
    """The rules in force, if any."""
    return _active


def install_redaction(rules: DlpRules | None) -> Callable[[], None]:
    """Make `rules` the active ones (None or `enabled = false`: none); returns the undo."""
    global _active
    previous = _active
    enabled = rules is not None and getattr(rules, "enabled", True)
    dlp = Dlp(rules) if enabled and rules is not None else None
    _active = dlp if dlp is not None and not dlp.empty else None
    if _active is not None:
        _install_log_factory()

    def undo() -> None:
        global _active
        _active = previous

    return undo


@contextlib.contextmanager
def redaction(rules: DlpRules | None) -> Iterator[None]:
    """`rules` are active inside the block; the ones before are restored after it."""
    undo = install_redaction(rules)
    try:
        yield
    finally:
        undo()


def _install_log_factory() -> None:
    """Wrap the log-record factory once; it masks only while rules are active."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def masked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        dlp = _active
        if dlp is not None:
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: logging reports it itself, later
                return record
            masked = dlp.mask_text(message)
            if masked != message:
                record.msg = masked
                record.args = None
        return record

    logging.setLogRecordFactory(masked_record)
    _factory_installed = True
