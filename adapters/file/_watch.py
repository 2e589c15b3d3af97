"""Directory events from `watchfiles`, turned into "these names changed" callbacks.

Events only make the source look sooner; the periodic full scan is what guarantees a file is
found, so a watcher that cannot start (inotify limits, a file system without events) is
logged and the source carries on with scans alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anyio
from watchfiles import Change, awatch

__all__ = ["watch_directory"]

# How long the watcher thread waits for events before checking the stop event again (ms):
# the stop event is set when the source stops, so this bounds nothing but a lost wake-up.
_RUST_TIMEOUT_MS = 1000


async def watch_directory(
    directory: Path,
    stop: anyio.Event,
    on_change: Callable[[set[str]], None],
    logger: logging.Logger,
) -> None:
    """Call `on_change(names)` for entries of `directory` added or modified, until `stop`."""
    try:
        async for changes in awatch(
            directory,
            stop_event=stop,
            recursive=False,
            watch_filter=_added_or_modified,
            debounce=200,
            step=20,
            rust_timeout=_RUST_TIMEOUT_MS,
        ):
            names = {Path(path).name for _, path in changes if Path(path).parent == directory}
            if names:
                on_change(names)
    except (OSError, RuntimeError) as exc:
        logger.warning(
            "cannot watch %s for events (%s); relying on the periodic rescan", directory, exc
        )


def _added_or_modified(change: Change, path: str) -> bool:
    return change is not Change.deleted
