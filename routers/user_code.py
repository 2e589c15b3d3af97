"""User code: load a function or type from `"module:attribute"` (with errors that say what to
fix), and call a blocking function off the event loop with a timeout (`ThreadedCall`)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import threading
from collections.abc import Callable
from typing import Any

import anyio
import anyio.to_thread

__all__ = ["ThreadedCall", "load_object"]


def load_object(reference: str) -> Any:
    """Import `module:attribute` (dotted attributes allowed); ValueError explains failures."""
    module_name, colon, attribute = reference.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"expected 'module:name', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} for {reference!r}: {exc} "
            "(is it installed, or on PYTHONPATH?)"
        ) from None
    value: Any = module
    for part in attribute.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ValueError(f"module {module_name!r} has no {attribute!r}") from None
    return value


class _Call:
    """One threaded call's state, shared by the event loop and the worker thread (`lock`)."""

    __slots__ = ("abandoned", "finished", "lock", "started")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = False
        self.finished = False
        self.abandoned = False


class ThreadedCall:
    """Calls a blocking user function in worker threads, off the event loop, with a timeout.

    At most `threads` calls hold a thread at once. A call past its `timeout` raises
    TimeoutError here, but its thread runs on until the function returns (a thread cannot be
    stopped) and keeps its place until then: a function that hangs for good ends up holding
    every place, and further calls wait instead of starting threads without end. `stuck`
    counts the abandoned calls still running.
    """

    def __init__(self, function: Callable[..., Any], *, timeout: float, threads: int) -> None:
        self.function = function
        self.timeout = timeout
        self.stuck = 0
        self._places = anyio.Semaphore(threads)
        # Never the bottleneck (a call takes a place first); without it anyio would use its
        # process-wide default limiter, shared with everything else that uses threads.
        self._limiter = anyio.CapacityLimiter(threads)

    async def __call__(self, *args: Any) -> Any:
        """`function(*args)` in a worker thread; TimeoutError after `timeout` seconds."""
        await self._places.acquire()
        loop = asyncio.get_running_loop()
        call = _Call()

        def run() -> Any:
            with call.lock:
                if call.abandoned:  # given up before a thread picked it up: skip it
                    return None
                call.started = True
            try:
                return self.function(*args)
            finally:
                with call.lock:
                    call.finished = True
                    abandoned = call.abandoned
                with contextlib.suppress(RuntimeError):  # the loop is closed: nothing to free
                    loop.call_soon_threadsafe(self._leave, abandoned)

        try:
            with anyio.fail_after(self.timeout):
                return await anyio.to_thread.run_sync(
                    run, abandon_on_cancel=True, limiter=self._limiter
                )
        except BaseException:
            with call.lock:
                call.abandoned = True
                started, finished = call.started, call.finished
            if not started:
                self._places.release()  # no thread ran it: its place is free now
            elif not finished:
                self.stuck += 1  # the thread frees its place (and this count) when it returns
            raise

    def _leave(self, abandoned: bool) -> None:
        if abandoned:
            self.stuck -= 1
        self._places.release()
