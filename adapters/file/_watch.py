"""Directory events from `watchfiles`, turned into "these names changed" callbacks.

Events only make the source look sooner; the periodic full scan is what guarantees a file is
found, so a watcher that cannot start (inotify limits, a file system without events) is
logged and the source carries on with scans alone.

`watchfiles` gives up its whole watch when an event names a file whose name is not UTF-8
("Unable to decode path"): the watch is started again after a short pause, and the scan,
which reads such names fine, takes the file (the source then moves it to `failed/`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import anyio
from watchfiles import Change, awatch

from busway.adapters.file._names import printable

__all__ = ["watch_directory"]

# How long the watcher thread waits for events before checking the stop event again (ms):
# the stop event is set when the source stops, so this bounds nothing but a lost wake-up.
_RUST_TIMEOUT_MS = 1000
_RESTART_PAUSE = 0.5  # after an undecodable name: bounds the restarts, events are a hint


async def watch_directory(
    directory: Path,
    stop: anyio.Event,
    on_change: Callable[[set[str]], None],
    logger: logging.Logger,
) -> None:
    """Call `on_change(names)` for entries of `directory` added or modified, until `stop`."""
    while not stop.is_set():
        failure = await _watch(directory, stop, on_change)
        if failure is None:
            return
        if isinstance(failure, RuntimeError) and "decode path" in str(failure):
            logger.debug("watch of %s restarted: %s", directory, printable(failure))
            with anyio.move_on_after(_RESTART_PAUSE):
                await stop.wait()
            continue
        logger.warning(
            "cannot watch %s for events (%s); relying on the periodic rescan",
            directory,
            printable(failure),
        )
        return


async def _watch(
    directory: Path, stop: anyio.Event, on_change: Callable[[set[str]], None]
) -> Exception | None:
    """Watch until `stop` (None) or until the watch fails (the error)."""
    failure: Exception | None = None
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
    except* (OSError, RuntimeError) as group:  # awatch raises inside a task group's group
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        failure = first if isinstance(first, Exception) else group
    return failure


def _added_or_modified(change: Change, path: str) -> bool:
    return change is not Change.deleted
