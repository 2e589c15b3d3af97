"""A partitioned route: one consumer per partition, each partition run by one daemon at a time.

The stream appends each message's partition to its subject (`busway._nats.partition_subjects`);
partition `i` of route `r` is the durable consumer `busway-route-r-p<i>` filtering on it. Which
daemon runs it is decided by the lease `=lease.=route.<r>.p<i>` in the state bucket
(`busway._nats.lease`: compare-and-set, fencing token, renewal every `ttl / 4`). Every daemon
running the route beats a member key (`busway._routing.partition_members`); from the sorted
list of live members each one computes the same assignment, partition `i` to member
`i mod n`, and contends only for its own share. A daemon that holds a partition another
member should have drains it and lets go; the other takes it at its next look. So:

* a new daemon gets a fair share (partitions differ by at most one) within a few `ttl / 4`;
* the partitions of a daemon killed with SIGKILL move within `1.5 * ttl` (its lease expiring;
  its member key goes stale in `ttl` meanwhile), plus the consumer's `ack_wait` for what it held;
* order holds regardless of ownership: a non-aggregating partitioned route runs with
  `max_in_flight = 1`, so JetStream never hands out a partition's next message before the
  previous one is acked or terminated (a nak with back-off keeps it pending, in front).

Nothing here runs per message: a partition's worker is an ordinary `RouteWorker`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import TaskStatus

from busway._nats.kv import Bucket
from busway._nats.lease import LeaseKeeper, lease_key
from busway._observe.metrics import ComponentStats
from busway._routing.partition_members import Membership
from busway._routing.worker import RouteWorker

__all__ = ["PartitionedRoute", "assign"]


def assign(members: list[str], count: int, member: str) -> frozenset[int]:
    """The partitions `member` should run: partition `i` goes to `members[i % len(members)]`
    (`members` sorted, the same list on every daemon), so shares differ by at most one."""
    if member not in members:
        return frozenset()
    position, size = members.index(member), len(members)
    return frozenset(i for i in range(count) if i % size == position)


class PartitionedRoute:
    """Runs the share of a partitioned route's partitions this daemon holds the leases of."""

    def __init__(
        self,
        *,
        name: str,
        count: int,
        ttl: float,
        holder: str,
        bucket: Bucket,
        make_worker: Callable[[int], RouteWorker],
        stats: ComponentStats,
        timeout: float,
        drain_timeout: float,
    ) -> None:
        self.name = name
        self.count = count
        self.ttl = ttl
        self.stats = stats
        self.logger = logging.getLogger(f"busway.route.{name}")
        self.members = Membership(bucket, name, holder, ttl=ttl, log=self.logger)
        self._keepers = [
            LeaseKeeper(
                bucket,
                lease_key(f"=route.{name}", f"p{i}"),
                ttl=ttl,
                holder=holder,
                log=self.logger,
                timeout=timeout,
            )
            for i in range(count)
        ]
        self._make_worker = make_worker
        self.workers: dict[int, RouteWorker] = {}
        """Partition → its running worker (the partitions this daemon holds now)."""
        self.wanted: frozenset[int] = frozenset()
        self.stopping = False
        self._changed = anyio.Event()
        self._timeout = timeout
        self._drain_timeout = drain_timeout
        """How long a partition handed over may take to settle what it holds."""

    # -- what the bus sees -----------------------------------------------------------------

    @property
    def max_in_flight(self) -> int:
        """Messages held at most: per partition held here."""
        return sum(worker.max_in_flight for worker in self.workers.values())

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Join the members, then own, run and hand over partitions until cancelled."""
        await self.members.beat()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.members.run)
            await self._refresh()
            tg.start_soon(self._rebalance)
            for index in range(self.count):
                tg.start_soon(self._own, index)
            self.stats.ready = True
            task_status.started()

    async def drain(self, timeout: float) -> bool:
        """Stop taking partitions; drain the ones held (each hands back what it holds)."""
        self.stopping = True
        self._drain_timeout = min(self._drain_timeout, timeout)
        self._notify()
        drained = False
        with anyio.move_on_after(timeout):
            while self.workers:
                await self._wait_changed()
            drained = True
        self.stats.ready = False
        return drained

    async def reset_pull(self) -> None:
        """Re-issue every partition's pull requests after a reconnect."""
        for worker in list(self.workers.values()):
            await worker.reset_pull()

    # -- ownership -------------------------------------------------------------------------

    async def _rebalance(self) -> None:
        while True:
            await anyio.sleep(self.ttl / 4)
            await self._refresh()

    async def _refresh(self) -> None:
        members = await self.members.alive()
        if members is None:
            return
        wanted = assign(members, self.count, self.members.key)
        if wanted != self.wanted:
            self.logger.info(
                "partitions: %d daemon(s) run this route; this one takes %s of %d",
                len(members),
                _ranges(wanted),
                self.count,
            )
            self.wanted = wanted
            self._notify()

    async def _own(self, index: int) -> None:
        """Forever: wait until `index` is this daemon's, win its lease, run it, hand it over."""
        keeper = self._keepers[index]
        while True:
            await self._until(lambda: not self.stopping and index in self.wanted)
            acquired = anyio.Event()
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._give_up_if_unwanted, index, acquired, tg.cancel_scope)
                async with keeper.hold() as lease:
                    acquired.set()
                    self._notify()
                    await self._serve(index)
                if lease.lost:
                    self.logger.warning("partition %d lost (%s)", index, lease.reason)
                tg.cancel_scope.cancel()

    async def _give_up_if_unwanted(
        self, index: int, acquired: anyio.Event, scope: anyio.CancelScope
    ) -> None:
        """While waiting for the lease: stop waiting if the partition is no longer ours."""
        await self._until(lambda: acquired.is_set() or self.stopping or index not in self.wanted)
        if not acquired.is_set():
            scope.cancel()

    async def _serve(self, index: int) -> None:
        """Run partition `index` until it is no longer ours, then drain it (a lost lease
        cancels this at once instead: what it held comes back to the next owner after
        `ack_wait`, behind nothing, since its consumer allows no message past it)."""
        worker = self._make_worker(index)
        try:
            async with anyio.create_task_group() as tg:
                await tg.start(worker.run)
                self.workers[index] = worker
                self.stats.ready = True
                self.logger.info("partition %d: running here", index)
                await self._until(lambda: self.stopping or index not in self.wanted)
                await worker.drain(self._drain_timeout)
                self.logger.info("partition %d: handed back", index)
                tg.cancel_scope.cancel()
        finally:
            self.workers.pop(index, None)
            self.stats.ready = not self.stopping
            self._notify()

    # -- waiting on changes ----------------------------------------------------------------

    def _notify(self) -> None:
        changed, self._changed = self._changed, anyio.Event()
        changed.set()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    async def _until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            await self._wait_changed()


def _ranges(indexes: Iterable[int]) -> str:
    listed = sorted(indexes)
    return "[" + ", ".join(str(i) for i in listed) + "]" if listed else "none"
