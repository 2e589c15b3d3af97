"""Suspects processed alone: the gate, and real attempts counted across daemons.

The gate tests drive it with tasks that block on events the test controls, and wait with
`wait_all_tasks_blocked` (every task is parked) before checking what has or has not started.
The crash scenarios themselves are in tests/faults/test_poison_crash.py (they need `busway run`
subprocesses to kill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import nats.js.errors
import orjson
import pytest
from nats.aio.client import Client as NatsClient

from busway import Bus
from busway._delivery.isolation import IsolationGate
from tests.configs import config_toml, stream_table
from tests.support import (
    NatsServer,
    decode_test_config,
    eventually,
    stream_messages,
    wait_settled,
)

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


calls: list[int] = []


def always_busy(body: dict[str, Any]) -> dict[str, Any]:
    """A stage whose partner is never free: every attempt fails with a transient error."""
    calls.append(body["id"])
    raise ConnectionError(f"partner busy for order {body['id']}")


async def test_attempts_survive_a_restart_and_a_second_daemon_counts_on(
    nats_server: NatsServer, nc: NatsClient, unique: str, tmp_path: Path
) -> None:
    """A failure naked by one daemon counts for the next one on the same config: the message
    is tried `max_attempts` times in all, not `max_attempts` more after each restart."""
    calls.clear()
    config = decode_test_config(
        config_toml(nats_server, http="", streams=[stream_table(f"ISO_{unique}", f"iso{unique}.>")])
        + f"""
[[routes]]
name = "busy{unique}"
from = "iso{unique}.in"
to = ["iso{unique}.out"]
retry = {{ max_attempts = 4, backoff = "300ms", max_backoff = "300ms" }}
stages = [{{ python = "tests.test_isolation:always_busy" }}]
""",
        tmp_path,
    )
    durable = f"busway-route-busy{unique}"
    async with Bus(config):
        await nc.jetstream().publish(f"iso{unique}.in", orjson.dumps({"id": 7}))

        async def tried_once() -> bool:
            return len(calls) == 1

        await eventually(tried_once)
    # The first daemon stopped during the back-off; the next one (a new process as far as
    # the ledger knows) receives the redelivery as a suspect, with nothing in memory.
    async with Bus(config):
        await wait_settled(nc, f"ISO_{unique}", durable)
    dead = [
        m
        for m in await stream_messages(nc, "BUSWAY_DEADLETTER")
        if m.subject == f"busway.deadletter.busy{unique}"
    ]
    assert calls == [7, 7, 7, 7]
    assert len(dead) == 1
    headers = dead[0].headers or {}
    assert headers["Busway-Error-Reason"] == "max_attempts"
    assert headers["Busway-Attempts"] == "4"
    assert "gave up after 4 attempt(s)" in headers["Busway-Error"]
    # The ledger entry is gone once the message is dead-lettered.
    bucket = await nc.jetstream().key_value(config.state_bucket)

    async def entry_deleted() -> bool:
        try:
            await bucket.get(f"isolation.{durable}.1")
        except nats.js.errors.KeyNotFoundError:
            return True
        return False

    await eventually(entry_deleted)
