"""A 3-node cluster under faults, two daemons on one config: nothing lost, nothing duplicated.

R3 streams (`[cluster] replicas = 3`), a plain route IN -> OUT and a per-message file sink (one
file per message, named by its number and its OUT sequence: a message stored twice in OUT would
make two files). While the messages are published (each with its own `Nats-Msg-Id`, retried
until JetStream confirms it), the scenario kills the node leading IN (SIGKILL) and restarts it,
freezes another node (SIGSTOP) for a few seconds, and kills one daemon (SIGKILL) and restarts
it. At the end every number must have exactly one file.

What this cannot show: an OS crash or power loss (a killed process keeps its page cache).
"""

from __future__ import annotations

import re
from pathlib import Path

import anyio
import nats
import nats.errors
import pytest

from tests.cluster_support import NatsCluster, nats_cluster
from tests.faults.helpers import Figures, consumer_settled
from tests.support import Daemon, eventually

pytestmark = [pytest.mark.anyio, pytest.mark.faults, pytest.mark.timeout(300)]

MESSAGES = 400
FILE_NAME = re.compile(r"^(\d+)-(\d+)\.json$")


def daemon_config(urls: list[str], out: Path) -> str:
    servers = ", ".join(f'"{url}"' for url in urls)
    return f"""
[nats]
servers = [{servers}]
connect_timeout = "30s"
publish_timeout = "5s"

[cluster]
replicas = 3

[http]
listen = "127.0.0.1:0"

[[streams]]
name = "IN"
subjects = ["in.>"]

[[streams]]
name = "OUT"
subjects = ["out.>"]

[[routes]]
name = "forward"
from = "in.orders"
to = ["out.orders"]
ack_wait = "5s"

[[sinks]]
type = "file"
name = "files"
from = "out.orders"
mode = "per-message"
path = "{out}/{{body[n]}}-{{seq}}.json"
fsync = false
ack_wait = "5s"
"""


class Progress:
    """How many messages are published; fault steps wait for a count through `reached`."""

    def __init__(self) -> None:
        self.count = 0
        self._marks: dict[int, anyio.Event] = {}

    def published(self) -> None:
        self.count += 1
        mark = self._marks.pop(self.count, None)
        if mark is not None:
            mark.set()

    async def reached(self, count: int) -> None:
        if self.count < count:
            await self._marks.setdefault(count, anyio.Event()).wait()


async def publish_all(urls: list[str], progress: Progress) -> None:
    """Publish MESSAGES numbered orders, each retried with its id until JetStream confirms it."""
    client = await nats.connect(urls, ping_interval=1, max_outstanding_pings=2)
    js = client.jetstream(timeout=2)
    try:
        for n in range(MESSAGES):
            while True:
                try:
                    await js.publish(
                        "in.orders", b'{"n": %d}' % n, headers={"Nats-Msg-Id": f"order-{n}"}
                    )
                    break
                except (nats.errors.Error, TimeoutError):
                    await anyio.sleep(0.1)  # back off, then the same id again (deduplicated)
            progress.published()
    finally:
        await client.close()


async def inject_faults(cluster: NatsCluster, daemons: list[Daemon], progress: Progress) -> None:
    """Leader kill and restart, a node freeze, a daemon kill and restart, as publishing goes."""
    await progress.reached(MESSAGES // 5)
    leader = await cluster.leader_of("IN")
    cluster.kill(leader)
    await progress.reached(2 * MESSAGES // 5)
    cluster.restart(leader)
    await cluster.wait_ready()
    other = (leader + 1) % 3
    cluster.freeze(other)
    await anyio.sleep(4)  # how long the node stays frozen: the fault, not a wait for a result
    cluster.thaw(other)
    await progress.reached(3 * MESSAGES // 5)
    daemons[0].kill()
    daemons[0].start()
    await daemons[0].ready(timeout=60)


async def test_two_daemons_on_r3_streams_survive_leader_kill_freeze_and_daemon_kill(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    async with nats_cluster(tmp_path / "cluster") as cluster:
        config = tmp_path / "busway.toml"
        config.write_text(daemon_config(cluster.urls, out))
        daemons = [Daemon(config, log=tmp_path / f"daemon-{n}.log") for n in (1, 2)]
        try:
            for daemon in daemons:
                daemon.start()
            for daemon in daemons:
                await daemon.ready(timeout=60)
            progress = Progress()
            with anyio.fail_after(120):
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish_all, cluster.urls, progress)
                    tg.start_soon(inject_faults, cluster, daemons, progress)

                async def all_written() -> bool:
                    names = {m.group(1) for p in out.iterdir() if (m := FILE_NAME.match(p.name))}
                    if len(names) < MESSAGES:
                        return False
                    try:
                        return await consumer_settled(cluster.urls[0], "OUT", "busway-sink-files")
                    except nats.errors.Error:
                        return False

                await eventually(all_written, timeout=90)
            for daemon in daemons:
                assert await daemon.stop() == 0, daemon.output()
        finally:
            for daemon in daemons:
                daemon.kill()

    written = [int(m.group(1)) for p in out.iterdir() if (m := FILE_NAME.match(p.name))]
    figures = Figures.of(
        "cluster-failover", range(MESSAGES), written, daemon_starts=sum(d.starts for d in daemons)
    ).report()
    assert (figures.delivered, figures.lost, figures.duplicated) == (MESSAGES, 0, 0), figures
    assert not figures.extra.get("unexpected"), figures
