"""The isolation gate: a suspect runs alone in the process, and normal work never starves it.

Each test drives the gate with tasks that block on events the test controls, and waits with
`wait_all_tasks_blocked` (every task is parked) before checking what has or has not started.
"""

from __future__ import annotations

import anyio
import pytest

from busway._isolation import IsolationGate

pytestmark = pytest.mark.anyio


async def normal_work(gate: IsolationGate, log: list[str], name: str, done: anyio.Event) -> None:
    """What a route or sink does around the processing of a normal message."""
    if not gate.open:
        await gate.wait_open()
    gate.enter()
    log.append(f"{name} starts")
    try:
        await done.wait()
    finally:
        log.append(f"{name} ends")
        gate.leave()


async def suspect_work(gate: IsolationGate, log: list[str], name: str, done: anyio.Event) -> None:
    async with gate.alone(name):
        log.append(f"{name} starts alone (others working: {gate.working})")
        await done.wait()
        log.append(f"{name} ends")


async def test_a_suspect_waits_for_work_in_progress_and_nothing_starts_while_it_runs() -> None:
    gate = IsolationGate()
    log: list[str] = []
    a_done, b_done, suspect_done, c_done = (anyio.Event() for _ in range(4))
    async with anyio.create_task_group() as tg:
        tg.start_soon(normal_work, gate, log, "a", a_done)
        tg.start_soon(normal_work, gate, log, "b", b_done)
        await anyio.wait_all_tasks_blocked()
        assert gate.working == 2

        tg.start_soon(suspect_work, gate, log, "suspect", suspect_done)
        await anyio.wait_all_tasks_blocked()
        assert not gate.open
        tg.start_soon(normal_work, gate, log, "c", c_done)  # arrives while the suspect waits
        await anyio.wait_all_tasks_blocked()
        assert log == ["a starts", "b starts"]  # neither the suspect nor c has started

        a_done.set()
        await anyio.wait_all_tasks_blocked()
        assert log == ["a starts", "b starts", "a ends"]  # b still works: the suspect waits

        b_done.set()
        await anyio.wait_all_tasks_blocked()
        assert log[3:] == ["b ends", "suspect starts alone (others working: 0)"]
        assert gate.isolating == "suspect"
        assert "c starts" not in log  # nothing starts while the suspect is processed

        suspect_done.set()
        await anyio.wait_all_tasks_blocked()
        assert log[5:] == ["suspect ends", "c starts"]
        assert gate.open
        assert gate.isolating is None
        c_done.set()
    assert log[-1] == "c ends"
    assert gate.working == 0


async def test_suspects_take_turns_and_normal_work_resumes_after_the_last() -> None:
    gate = IsolationGate()
    log: list[str] = []
    first_done, second_done, normal_done = anyio.Event(), anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(suspect_work, gate, log, "first", first_done)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(suspect_work, gate, log, "second", second_done)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(normal_work, gate, log, "normal", normal_done)
        await anyio.wait_all_tasks_blocked()
        assert log == ["first starts alone (others working: 0)"]

        first_done.set()
        await anyio.wait_all_tasks_blocked()
        # The second suspect goes before the normal message that came in meanwhile.
        assert log[1:] == ["first ends", "second starts alone (others working: 0)"]

        second_done.set()
        await anyio.wait_all_tasks_blocked()
        assert log[3:] == ["second ends", "normal starts"]
        normal_done.set()


async def test_a_cancelled_suspect_reopens_the_gate() -> None:
    gate = IsolationGate()
    log: list[str] = []
    busy, normal_done = anyio.Event(), anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(normal_work, gate, log, "busy", busy)
        await anyio.wait_all_tasks_blocked()
        with anyio.CancelScope() as scope:
            tg.start_soon(_cancel_soon, scope)
            await suspect_work(gate, log, "suspect", anyio.Event())  # waits for "busy"
        assert gate.open  # the cancelled suspect no longer holds new work back
        tg.start_soon(normal_work, gate, log, "normal", normal_done)
        await anyio.wait_all_tasks_blocked()
        assert log == ["busy starts", "normal starts"]
        busy.set()
        normal_done.set()


async def _cancel_soon(scope: anyio.CancelScope) -> None:
    await anyio.wait_all_tasks_blocked()
    scope.cancel()
