"""The poison-message crash loop with TWO daemons on one config, sharing one consumer.

The isolation ledger lives in the shared state bucket, so whichever daemon receives the next
delivery of the poison can tell the previous process died while processing it alone, whether
that was itself (an earlier incarnation) or the other daemon. Same route, same 201 orders and
same stage as `test_poison_crash` (the poison calls `os._exit(1)`, two innocents fail once
with a transient error); each daemon is restarted by the supervisor after it dies.

The bound on crashes follows from the rule, not from the number of daemons: the first crash
(the poison processed beside others) blames nobody; from then on every delivery of the poison
is a suspect, processed alone under a marker, so each crash is counted once by whichever
process gets the next delivery; after `max_attempts` counted crashes it is dead-lettered on
arrival. So exactly `max_attempts + 1` crashes in all. A daemon that dies holding innocents
(the one beside the first crash, or waiting for the gate while the poison ran alone) only makes
them suspects: processed alone, never crashing, never counted.
"""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.faults.helpers import Figures, read_stream
from tests.faults.test_poison_crash import (
    FLAKY,
    INNOCENT,
    MAX_ATTEMPTS,
    POISON,
    ROUTE,
    assert_poison_dead_lettered_alone,
    daemon_config,
    dead_letters_of,
    publish_orders,
    supervise_all,
)
from tests.support import REPO, Daemon, NatsServer

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(300)]


async def test_two_daemons_dead_letter_a_crashing_message_once_and_spare_the_rest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the daemons import the poison stage
    monkeypatch.setenv("BUSWAY_TEST_FLAKY_DIR", str(tmp_path))
    store = tmp_path / "nats"
    store.mkdir()
    server = NatsServer(store)
    config = tmp_path / "busway.toml"
    config.write_text(daemon_config(server.url, ROUTE, http=False))  # one config for both
    daemons = [Daemon(config, log=tmp_path / f"daemon-{n}.log") for n in (1, 2)]
    try:
        await publish_orders(server.url)
        crashes = await supervise_all(
            daemons, server.url, "busway-route-price", max_crashes=MAX_ATTEMPTS + 3
        )
        for daemon in daemons:
            assert await daemon.stop() == 0
        outputs = await read_stream(server.url, "CRASH_OUT")
        dead = dead_letters_of(await read_stream(server.url, "BUSWAY_DEADLETTER"), "price")
    finally:
        for daemon in daemons:
            daemon.kill()
        server.stop()

    delivered = [orjson.loads(m.data)["id"] for m in outputs]
    figures = Figures.of(
        "poison-crash:two-daemons",
        [n for n in range(INNOCENT + 1) if n != POISON],
        delivered,
        crashes=crashes,
        dead_lettered=len(dead),
    ).report()
    assert (figures.delivered, figures.lost, figures.duplicated) == (INNOCENT, 0, 0), figures
    assert POISON not in delivered  # nothing both delivered and dead-lettered
    assert_poison_dead_lettered_alone(dead)  # once, reason `crashed`, no innocent
    assert crashes == MAX_ATTEMPTS + 1
    assert all((tmp_path / str(n)).exists() for n in FLAKY)  # each failed once, then got through
    assert sum(daemon.starts for daemon in daemons) == 2 + crashes
