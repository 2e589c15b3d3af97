"""One worker of `busway run --workers N`: what it is told by its supervisor, and what it tells.

The supervisor (`supervisor.py`) starts each worker as `busway run CONFIG` with the
`BUSWAY_WORKER` environment variable holding its role (JSON): its number, how many there are,
the embedded nats-server's URL (the supervisor runs it, one for the set) and the HTTP ports it
reserved. The worker runs the config with those settings substituted (at start and at each
reload, so a reload compares like with like) and binds the ports with SO_REUSEPORT.

The two talk over the worker's standard streams, one JSON object per line:

* worker -> supervisor (stdout): `{"event": "ready"}` once started, `{"event": "reload",
  "exit": N, "message": "..."}` after each SIGHUP;
* supervisor -> worker (stdin): the set's state, `{"running": k, "count": n, "reason": ...,
  "embedded_nats": bool}`, whenever it changes. End of input means the supervisor is gone:
  the worker drains and exits.

Logs go to stderr, shared with the supervisor's, each line tagged with the worker's number.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import asdict, dataclass
from typing import Any

import anyio
import msgspec
from prometheus_client.core import Metric
from prometheus_client.registry import CollectorRegistry

from busway._bus import Bus
from busway._config.model import Config

__all__ = [
    "ENVIRONMENT_VARIABLE",
    "SetState",
    "WorkerBus",
    "WorkerChannel",
    "WorkerRegistry",
    "WorkerRole",
]

ENVIRONMENT_VARIABLE = "BUSWAY_WORKER"


@dataclass(frozen=True)
class WorkerRole:
    """What the supervisor tells one worker at its start."""

    index: int
    """1..count; stable across restarts of this worker (log tags, `BUSWAY_DAEMON`)."""
    count: int
    nats_url: str | None
    """The embedded nats-server the supervisor runs; None with `[nats] servers`."""
    listen: str | None
    """`[http] listen` with the port the supervisor reserved (the picked one for `:0`)."""
    admin_listen: str | None

    def to_env(self) -> str:
        """The role as the value of `BUSWAY_WORKER`."""
        return json.dumps(asdict(self))

    @classmethod
    def take(cls, environ: MutableMapping[str, str] | None = None) -> WorkerRole | None:
        """The role from the environment, removed from it (a process this worker starts is
        not a worker); None for a plain `busway run`."""
        environ = os.environ if environ is None else environ
        value = environ.pop(ENVIRONMENT_VARIABLE, None)
        if value is None:
            return None
        return cls(**json.loads(value))

    def apply(self, config: Config) -> Config:
        """`config` with the supervisor's NATS server and HTTP ports substituted."""
        nats = config.nats
        if self.nats_url is not None:
            nats = msgspec.structs.replace(nats, servers=[self.nats_url])
        http = msgspec.structs.replace(
            config.http, listen=self.listen, admin_listen=self.admin_listen
        )
        return msgspec.structs.replace(config, nats=nats, http=http)


@dataclass
class SetState:
    """The whole set as the supervisor last described it to this worker."""

    running: int
    count: int
    reason: str | None = None
    embedded_nats: bool = True

    @classmethod
    def initial(cls, role: WorkerRole) -> SetState:
        """Before the first word from the supervisor: the set is still starting."""
        return cls(running=0, count=role.count, reason="the workers are starting")


class WorkerBus(Bus):
    """A `Bus` whose `/healthz` and `/readyz` also tell the truth about its set.

    Any worker may answer a probe on the shared port, so each answers for the set: live while
    the supervisor's embedded nats-server is up, ready while it is ready itself *and* every
    worker runs (a restarting worker makes the set "not all up", named in the reason).
    """

    def __init__(self, config: Config, role: WorkerRole) -> None:
        super().__init__(role.apply(config), reuse_port=True)
        self._role = role
        self._set = SetState.initial(role)
        # Before anything else registers (the listener does at start): every series it serves
        # carries this worker's number, so workers' counters never merge into one series.
        self.metrics_registry = WorkerRegistry(role.index)
        self.metrics_registry.register(self.metrics)

    def update_set(self, state: SetState) -> None:
        """The supervisor's latest description of the set."""
        self._set = state

    def health(self) -> dict[str, bool]:
        """This worker's liveness checks plus the supervisor's embedded nats-server."""
        checks = super().health()
        if self._role.nats_url is not None:
            checks["embedded_nats"] = self._set.embedded_nats
        return checks

    def readiness_reasons(self) -> dict[str, str | None]:
        """This worker's readiness checks plus `workers`: every worker of the set running."""
        checks = super().readiness_reasons()
        checks["workers"] = self._set.reason
        return checks


class WorkerRegistry(CollectorRegistry):
    """A registry whose samples all carry `worker="N"`.

    A scrape of the shared port reaches one worker; the label keeps each worker's counters a
    series of their own (a restarted worker's start from zero like any restarted process),
    so `sum without (worker) (rate(...))` gives the set's rates.
    """

    def __init__(self, worker: int) -> None:
        super().__init__(auto_describe=True)
        self.worker = str(worker)

    def collect(self) -> Iterable[Metric]:
        """The registered collectors' metrics, each sample labelled with the worker."""
        for metric in super().collect():
            metric.samples = [
                sample._replace(labels={**sample.labels, "worker": self.worker})
                for sample in metric.samples
            ]
            yield metric


class WorkerChannel:
    """The worker's side of the standard-stream channel to its supervisor."""

    def __init__(self, role: WorkerRole) -> None:
        self.role = role

    def send(self, event: str, **fields: Any) -> None:
        """One line to the supervisor (stdout is this channel only; logs go to stderr)."""
        line = json.dumps({"event": event, **fields})
        with contextlib.suppress(OSError):  # the supervisor is gone: nothing to tell
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    async def listen(self, bus: WorkerBus) -> None:
        """Apply the supervisor's set states to `bus`; stop the bus when the supervisor is gone."""
        fd = sys.stdin.fileno()
        os.set_blocking(fd, False)
        buffered = b""
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                bus.stop()
                return
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                state = _decode_state(line)
                if state is not None:
                    bus.update_set(state)


def _decode_state(line: bytes) -> SetState | None:
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, Mapping):
        return None
    with contextlib.suppress(TypeError):
        return SetState(**fields)
    return None
