"""`busway run --workers N`: N worker processes on one config, supervised by this one.

Why processes: one busway process runs on one core (one event loop, the GIL). The workers
share everything that matters through JetStream (each route and sink is one durable consumer,
so JetStream hands each message to one worker) and the HTTP port through SO_REUSEPORT (the
kernel spreads connections over the workers' sockets). Nothing is shared in memory.

The supervisor:

* reserves the HTTP port(s) before any worker starts: a port in use is one line and exit 2,
  not N worker tracebacks. It keeps a bound, non-listening SO_REUSEPORT socket for its whole
  life (it receives no connections), so a restarting worker always gets the port back;
* runs the embedded nats-server (without `[nats] servers`), one for the set, and restarts it
  like a single daemon does; with external servers it runs none;
* writes the pid file with its own pid: `busway reload` signals it, it forwards SIGHUP to
  every worker and reports their combined outcome;
* restarts a worker that dies with back-off (1, 2, 4, 8, 16 s); after five restarts in a row
  that did not last a minute it gives up, stops the others and exits 1, for the service
  manager to restart the whole;
* on SIGTERM/SIGINT forwards SIGTERM to every worker, waits for each to drain (within
  `shutdown_timeout` plus a margin, then SIGKILL), stops the embedded server and exits 0 when
  every worker exited 0;
* tells each worker the set's state (workers running, embedded server up) so any worker
  answering `/readyz` on the shared port answers for the set (`worker.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
from anyio.abc import TaskGroup

from busway._cli.support import EXIT_FAILURE, EXIT_STARTUP
from busway._cli.worker import ENVIRONMENT_VARIABLE, WorkerRole
from busway._config.model import Config, split_listen
from busway._errors import BuswayError, StartupError
from busway._ingress.listener import bind_socket
from busway._nats.embedded import RESTART_DELAYS, STABLE_AFTER, EmbeddedNatsServer

__all__ = ["parse_workers", "supervise"]

logger = logging.getLogger("busway.workers")

ResultWriter = Callable[[Path, int, int, str], None]
_DAEMON_VARIABLE = "BUSWAY_DAEMON"  # read by the file sink's `{daemon}` (adapters/file)
_PR_SET_PDEATHSIG = 1
_KILL_MARGIN = 15.0  # beyond shutdown_timeout, as for a single daemon's second signal


def parse_workers(value: str) -> int:
    """`--workers` value: a count from 1, or `auto` (one per CPU); ValueError saying so."""
    if value == "auto":
        return os.cpu_count() or 1
    if not value.isdigit() or not 1 <= int(value) <= 1024:
        raise ValueError(f"--workers expects a number from 1 to 1024 or 'auto', got {value!r}")
    return int(value)


@dataclass
class _Worker:
    """One worker slot: its current process and what it reported."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    ever_ready: bool = False
    started_at: float = 0.0
    restarts: int = 0
    last_exit: str = ""
    reloads: list[tuple[int, str]] = field(default_factory=list)
    reloaded: anyio.Event = field(default_factory=anyio.Event)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Supervisor:
    """Runs and watches the workers of one `busway run --workers N`."""

    def __init__(
        self,
        config_path: str,
        config: Config,
        count: int,
        log_args: list[str],
        write_result: ResultWriter,
    ) -> None:
        self.config_path = config_path
        self.write_result = write_result
        self.config = config
        self.count = count
        self.log_args = log_args
        self.workers = [_Worker(index) for index in range(1, count + 1)]
        self.embedded: EmbeddedNatsServer | None = None
        self.stopping = False
        self.failure: BuswayError | None = None
        self.all_ready = anyio.Event()
        self._stop_requested = anyio.Event()
        self._sockets: list[socket.socket] = []
        self._listen: str | None = None
        self._admin_listen: str | None = None
        self._state_sent: dict[int, bytes] = {}
        self._daemon = os.environ.get(_DAEMON_VARIABLE, "").strip() or socket.gethostname()

    # -- start-up ----------------------------------------------------------------------------

    def reserve_ports(self) -> None:
        """Bind (without listening) `[http] listen` and `admin_listen`; StartupError if taken."""
        http = self.config.http
        if http.listen:
            self._listen = self._reserve(http.listen, "listen")
        if http.admin_listen:
            self._admin_listen = self._reserve(http.admin_listen, "admin_listen")

    def _reserve(self, listen: str, key: str) -> str:
        host, port = split_listen(listen)
        sock = bind_socket(host, port, key, reuse_port=True)
        self._sockets.append(sock)
        bound = sock.getsockname()[1]
        return f"[{host}]:{bound}" if ":" in host else f"{host}:{bound}"

    def release_ports(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []

    def role(self, worker: _Worker) -> WorkerRole:
        return WorkerRole(
            index=worker.index,
            count=self.count,
            nats_url=self.embedded.url if self.embedded is not None else None,
            listen=self._listen,
            admin_listen=self._admin_listen,
        )

    # -- workers -----------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            ENVIRONMENT_VARIABLE: self.role(worker).to_env(),
            # Each worker is a daemon of its own for `{daemon}` file names; stable per slot.
            _DAEMON_VARIABLE: f"{self._daemon}-w{worker.index}",
        }
        # From the event loop's thread: PDEATHSIG fires when the forking *thread* ends.
        process = subprocess.Popen(
            [sys.executable, "-m", "busway", "run", self.config_path, *self.log_args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            preexec_fn=_die_with_parent,
            # Its own group: Ctrl-C reaches the supervisor alone, which forwards one SIGTERM.
            process_group=0,
        )
        assert process.stdin is not None
        assert process.stdout is not None
        os.set_blocking(process.stdin.fileno(), False)
        os.set_blocking(process.stdout.fileno(), False)
        worker.process = process
        worker.ready = False
        worker.started_at = time.monotonic()
        self._state_sent.pop(worker.index, None)
        logger.info("worker %d started (pid %d)", worker.index, process.pid)
        return process

    async def run_worker(self, worker: _Worker) -> None:
        """Keep one worker slot running until the set stops (or gives up on it)."""
        crashes = 0
        while True:
            process = self._spawn(worker)
            await self._read_events(worker, process)
            code = await _wait_exit(process)
            worker.ready = False
            worker.last_exit = _exit_description(code)
            if self.stopping:
                level = logging.INFO if code == 0 else logging.WARNING
                logger.log(
                    level, "worker %d (pid %d) %s", worker.index, process.pid, worker.last_exit
                )
                return
            if not worker.ever_ready and code == EXIT_STARTUP:
                # It said why on its own stderr, in one line: a restart cannot fix it.
                self.fail(StartupError(f"worker {worker.index} could not start"))
                return
            if time.monotonic() - worker.started_at >= STABLE_AFTER:
                crashes = 0
            if crashes == len(RESTART_DELAYS):
                self.fail(
                    BuswayError(
                        f"worker {worker.index} {worker.last_exit} {crashes + 1} times in a row; "
                        "giving up"
                    )
                )
                return
            delay = RESTART_DELAYS[crashes]
            crashes += 1
            logger.error(
                "worker %d (pid %d) %s; restarting it in %.0fs (restart %d of at most %d in a row)",
                worker.index,
                process.pid,
                worker.last_exit,
                delay,
                crashes,
                len(RESTART_DELAYS),
            )
            with anyio.move_on_after(delay):
                await self._stop_requested.wait()
            if self._stop_requested.is_set():
                return
            worker.restarts += 1

    async def _read_events(self, worker: _Worker, process: subprocess.Popen[bytes]) -> None:
        """Read the worker's event lines until it closes its stdout (it exits)."""
        assert process.stdout is not None
        fd = process.stdout.fileno()
        buffered = b""
        while True:
            await anyio.wait_readable(fd)
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                return
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in lines:
                self._on_event(worker, line)

    def _on_event(self, worker: _Worker, line: bytes) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict):  # not ours: something printed to stdout; pass it on
            sys.stdout.buffer.write(line + b"\n")
            sys.stdout.flush()
            return
        if event.get("event") == "ready":
            worker.ready = worker.ever_ready = True
            if all(w.ready for w in self.workers):
                self.all_ready.set()
        elif event.get("event") == "reload":
            worker.reloads.append((int(event.get("exit", EXIT_FAILURE)), str(event.get("message"))))
            worker.reloaded.set()

    # -- the set's state, told to every worker -----------------------------------------------

    def state(self) -> dict[str, object]:
        running = sum(w.ready and w.alive for w in self.workers)
        reason = None
        if running < self.count:
            down = [
                f"worker {w.index} {_condition(w)}"
                for w in self.workers
                if not (w.ready and w.alive)
            ]
            reason = f"{running} of {self.count} workers running: {', '.join(down)}"
        embedded_up = self.embedded.up if self.embedded is not None else True
        return {
            "running": running,
            "count": self.count,
            "reason": reason,
            "embedded_nats": embedded_up,
        }

    async def tell_workers(self) -> None:
        """Send each worker the set's state whenever it changes (polled: cheap, 4 times/s)."""
        while True:
            line = (json.dumps(self.state()) + "\n").encode()
            for worker in self.workers:
                process = worker.process
                if not worker.alive or process is None or process.stdin is None:
                    continue
                if self._state_sent.get(worker.index) == line:
                    continue
                with contextlib.suppress(BlockingIOError, BrokenPipeError):
                    os.write(process.stdin.fileno(), line)
                    self._state_sent[worker.index] = line
            await anyio.sleep(0.25)

    # -- signals -----------------------------------------------------------------------------

    def signal_workers(self, signum: int) -> None:
        for worker in self.workers:
            if worker.alive and worker.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signum)

    async def reload(self, results: Path, number: int, timeout: float) -> None:
        """Forward SIGHUP to every worker; write their combined outcome for `busway reload`."""
        targets = [w for w in self.workers if w.alive]
        for worker in targets:
            worker.reloaded = anyio.Event()
            worker.reloads.clear()
        self.signal_workers(signal.SIGHUP)
        outcomes: list[tuple[int, int, str]] = []
        with anyio.move_on_after(timeout):
            for worker in targets:
                await worker.reloaded.wait()
        for worker in targets:
            if worker.reloads:
                code, message = worker.reloads[-1]
            else:
                code, message = EXIT_FAILURE, "no reload outcome (it restarted or is still busy)"
            outcomes.append((worker.index, code, message))
        code = max(c for _, c, _ in outcomes) if outcomes else EXIT_FAILURE
        messages = {m for _, _, m in outcomes}
        if len(messages) == 1:
            message = f"{messages.pop()} (all {len(outcomes)} workers)"
        else:
            message = "; ".join(f"worker {i}: {m}" for i, _, m in outcomes)
        logger.log(logging.ERROR if code else logging.INFO, "reload: %s", message)
        self.write_result(results, number, code, message)

    def fail(self, error: BuswayError) -> None:
        if self.failure is None:
            self.failure = error
            logger.error("stopping all workers: %s", error)
        self.stop()

    def stop(self) -> None:
        if not self.stopping:
            self.stopping = True
            self._stop_requested.set()
            self.signal_workers(signal.SIGTERM)

    async def wait_workers_exited(self, grace: float) -> bool:
        """Wait for every worker to exit; SIGKILL those left after `grace`. True if all 0."""
        with anyio.move_on_after(grace):
            while any(w.alive for w in self.workers):  # noqa: ASYNC110 - children's exits
                await anyio.sleep(0.05)
        for worker in self.workers:
            if worker.alive and worker.process is not None:
                logger.warning("worker %d did not stop in %.0fs; killing it", worker.index, grace)
                worker.process.kill()
                worker.process.wait()
        return all(w.process is None or w.process.returncode == 0 for w in self.workers)


async def supervise(
    config_path: str,
    config: Config,
    count: int,
    *,
    log_args: list[str],
    pid_file: Path,
    results: Path,
    write_result: ResultWriter,
) -> int:
    """Run `count` workers on `config` until SIGTERM/SIGINT; the exit code of `busway run`.

    `write_result(results, number, exit, message)` reports a reload to `busway reload`.
    """
    supervisor = Supervisor(config_path, config, count, log_args, write_result)
    grace = float(config.shutdown_timeout) + _KILL_MARGIN
    try:
        supervisor.reserve_ports()
        if config.nats.servers is None:
            supervisor.embedded = EmbeddedNatsServer(
                config.nats, config.resolve_path(config.nats.data_dir)
            )
            await supervisor.embedded.start()
    except StartupError as exc:
        supervisor.release_ports()
        logger.error("cannot start: %s", " ".join(str(exc).split()))
        return EXIT_STARTUP
    _write_pid(pid_file)
    clean = False
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, supervisor, signals, tg, results, grace)
                if supervisor.embedded is not None:
                    tg.start_soon(_watch_embedded, supervisor, supervisor.embedded)
                tg.start_soon(supervisor.tell_workers)
                tg.start_soon(_announce_ready, supervisor)
                async with anyio.create_task_group() as workers:
                    for worker in supervisor.workers:
                        workers.start_soon(supervisor.run_worker, worker)
                clean = await supervisor.wait_workers_exited(grace)
                tg.cancel_scope.cancel()
    finally:
        supervisor.stop()
        with anyio.CancelScope(shield=True):
            await supervisor.wait_workers_exited(grace)
            if supervisor.embedded is not None:
                await supervisor.embedded.stop()
        supervisor.release_ports()
        _remove(pid_file, results)
    if supervisor.failure is not None:
        started = any(w.ever_ready for w in supervisor.workers)
        if isinstance(supervisor.failure, StartupError) and not started:
            return EXIT_STARTUP
        return EXIT_FAILURE
    logger.info("stopped: %d worker(s)", count)
    return 0 if clean else EXIT_FAILURE


async def _announce_ready(supervisor: Supervisor) -> None:
    await supervisor.all_ready.wait()
    pids = ", ".join(str(w.process.pid) for w in supervisor.workers if w.process is not None)
    logger.info("busway ready: %d worker(s) (pids %s)", supervisor.count, pids)


async def _watch_signals(
    supervisor: Supervisor,
    signals: AsyncIterator[int],
    tg: TaskGroup,
    results: Path,
    grace: float,
) -> None:
    reloads = 0
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if not supervisor.all_ready.is_set() or supervisor.stopping:
                logger.warning("SIGHUP while starting or stopping: ignored; reload once ready")
                continue
            reloads += 1
            tg.start_soon(supervisor.reload, results, reloads, grace)
            continue
        if supervisor.stopping:
            logger.warning("second %s: telling the workers to stop now", name)
            supervisor.signal_workers(signal.SIGTERM)
            continue
        logger.info("%s received: stopping %d worker(s)", name, supervisor.count)
        supervisor.stop()


async def _watch_embedded(supervisor: Supervisor, embedded: EmbeddedNatsServer) -> None:
    try:
        await embedded.watch()
    except BuswayError as exc:
        supervisor.fail(exc)


def _condition(worker: _Worker) -> str:
    """Why a worker is not running, for `/readyz`: it exited (not yet seen by its slot's task,
    or waiting to be restarted) or it is (re)starting."""
    process = worker.process
    if process is not None and process.poll() is not None:
        return f"restarting ({_exit_description(process.returncode)})"
    return f"restarting ({worker.last_exit})" if worker.last_exit else "starting"


async def _wait_exit(process: subprocess.Popen[bytes]) -> int:
    while process.poll() is None:  # noqa: ASYNC110 - a child's exit has no event here
        await anyio.sleep(0.05)
    return process.returncode


def _exit_description(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _write_pid(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def _remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
