"""Keeps a started source running: a crash after start-up is contained and the source restarted.

A source's `run` may raise anything once it is running (a file name its code did not foresee,
a bug in an application's adapter). That must not take the daemon down with it: routes and
sinks beside it have nothing to do with it. So:

* before `task_status.started()`, the first run fails start-up as before (StartupError, one
  line): a source that cannot start at all is a config or environment problem to fix now;
* after it, any `Exception` escaping `run` (not cancellation) is logged in one line (the
  traceback at debug level), counted as `busway_errors_total{reason="source_crashed"}`, shown
  by /readyz and /status as the reason the source is not ready, and the source is restarted
  after a back-off: 1 s, doubling to 30 s, back to 1 s once a run lasted `healthy_after`.

What a source publishes is stored before it answers its peer, so a restart loses nothing: the
restarted run picks up where its peer (a file in processing/, a watermark) says it was.
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from anyio.abc import TaskStatus

from busway._components import Source, SourceContext

__all__ = ["CRASHED", "run_source"]

CRASHED = "source_crashed"
"""The error reason counted for a source crash, and its key in `ComponentStats.problems`."""


class _Started(TaskStatus[None]):
    """Passes the first `started()` on to the engine's start-up; later runs only report it."""

    def __init__(self, outer: TaskStatus[None] | None, on_started: Callable[[], None]) -> None:
        self._outer = outer
        self._on_started = on_started
        self.called = False

    def started(self, value: None = None) -> None:
        if self.called:
            return
        self.called = True
        if self._outer is not None:
            self._outer.started()
        self._on_started()


async def run_source(
    source: Source,
    context: SourceContext,
    *,
    task_status: TaskStatus[None],
    on_restarted: Callable[[], None] = lambda: None,
    first_delay: float = 1.0,
    max_delay: float = 30.0,
    healthy_after: float = 60.0,
) -> None:
    """Run `source` until cancelled, restarting it after a crash (see the module docstring).

    `on_restarted` is called each time a restarted run is ready again (the engine rebuilds the
    HTTP app then, from the routes the new run added).
    """
    stats = context.stats

    def restarted() -> None:
        stats.problems.pop(CRASHED, None)
        context.logger.info("source %r restarted", context.name)
        on_restarted()

    status = _Started(task_status, lambda: None)
    delay = first_delay
    crashes = 0
    while True:
        began = anyio.current_time()
        try:
            await source.run(context, task_status=status)
        except Exception as exc:
            if crashes == 0 and not status.called:
                raise  # the first start failed: start-up fails, as it always did
            if anyio.current_time() - began >= healthy_after:
                delay = first_delay
            crashes += 1
            error = _describe(exc)
            stats.count_error(CRASHED)
            stats.note_error(f"crashed: {error}")
            stats.problems[CRASHED] = (
                f"crashed ({crashes} time(s)), restarting after {delay:g}s back-off "
                "(the log and busway status show the error)"
            )
            context.logger.error(
                "source %r crashed: %s; restarting in %gs", context.name, error, delay
            )
            context.logger.debug("source %r crash traceback", context.name, exc_info=exc)
        else:
            return  # a source that returns on its own has finished: nothing to restart
        if context.http_routes is not None:
            context.http_routes.clear()  # the restarted run adds its own routes again
        await anyio.sleep(delay)
        delay = min(delay * 2, max_delay)
        status = _Started(None, restarted)


def _describe(exc: BaseException) -> str:
    """`Type: message` of the first real error inside (possibly nested) exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
