"""The `busway` command: a thin layer over `Bus` and `load_config`.

    busway run busway.toml      run until SIGINT/SIGTERM, then stop gracefully (exit 0)
    busway run --workers N busway.toml  the same in N supervised worker processes (all cores)
    busway check busway.toml    decode and compile everything without connecting
    busway test routes.test.toml  run route test cases against the compiled routes, no broker
    busway reload busway.toml   check the config, SIGHUP the running daemon, report its outcome
    busway status busway.toml   per component: state, rates, backlog, circuit, last error
    busway status --orphans busway.toml   durable consumers no route or sink uses any more
    busway schema [--markdown]  the config's JSON Schema (editors) or Markdown reference
    busway dlq list|show|replay|purge busway.toml  inspect, replay or purge dead letters
    busway audit busway.toml [--principal P] [--since T]  read the [audit] trail

Exit codes: 0 success; 1 a failure at run time (the daemon stopped on an error it could not
recover from, a reload that failed, an unreachable daemon); 2 invalid configuration, or
`busway run` could not start (a port taken, a data_dir in use, NATS unreachable or refusing
the credentials, a bad certificate): one line on stderr, no traceback, and a service manager
should not restart in a loop on it without a fix.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import logging
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from busway import __version__
from busway._bus import Bus
from busway._cli.audit import add_audit_parser, run_audit
from busway._cli.dlq import add_dlq_parser, run_dlq
from busway._cli.orphans import print_orphans
from busway._cli.route_tests import config_path_of, load_cases, run_cases
from busway._cli.supervisor import parse_workers, supervise
from busway._cli.support import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    EXIT_STARTUP,
    load_or_report,
    one_line,
    plan_or_report,
)
from busway._cli.worker import WorkerBus, WorkerChannel, WorkerRole
from busway._config.model import Config, load_config, locate_in_file, split_listen
from busway._config.schema import (
    config_reference,
    config_schema,
)
from busway._errors import BuswayError, ConfigError
from busway._nats.embedded import process_alive
from busway._observe.logging import configure_logging
from busway._observe.status import format_status
from busway._registry import default_registry

__all__ = ["main"]

logger = logging.getLogger("busway")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `busway` console script; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    handler = _COMMANDS[args.command]
    return handler(args)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="busway",
        description="A lightweight enterprise service bus on NATS JetStream.",
    )
    parser.add_argument("--version", action="version", version=f"busway {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon for a config file")
    run.add_argument("config", help="path of the busway TOML file")
    run.add_argument("--log-format", choices=["human", "json"], default="human")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    run.add_argument(
        "--workers",
        metavar="N",
        help="run N worker processes sharing the consumers and the HTTP port (`auto`: one "
        "per CPU), supervised by this one",
    )
    check = commands.add_parser(
        "check", help="validate a config file: decode, compile expressions, build adapters"
    )
    check.add_argument("config", help="path of the busway TOML file")
    schema = commands.add_parser(
        "schema", help="print the config's JSON Schema (for editors) or its Markdown reference"
    )
    schema.add_argument("--markdown", action="store_true", help="the reference, as Markdown")
    schema.add_argument(
        "--update-docs",
        metavar="PAGE",
        help="rewrite this page with the reference (docs/reference/config.md)",
    )
    schema.add_argument("--update-readme", metavar="README", help=argparse.SUPPRESS)
    status = commands.add_parser(
        "status", help="show the running daemon's components: state, rates, backlog, errors"
    )
    status.add_argument("config", help="path of the busway TOML file the daemon runs")
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    status.add_argument(
        "--orphans",
        action="store_true",
        help="list durable consumers on busway's streams that no route or sink uses (read-only)",
    )
    reload = commands.add_parser(
        "reload",
        help="check a config, make the running daemon reload it (SIGHUP), report the outcome",
    )
    reload.add_argument("config", help="path of the busway TOML file the daemon runs")
    reload.add_argument(
        "--wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="how long to wait for the daemon's outcome (it drains changed components first)",
    )
    test = commands.add_parser(
        "test", help="run route test cases (inputs and expected outputs) without a broker"
    )
    test.add_argument("tests", help="path of the test TOML file")
    test.add_argument("--config", help="config file to test (default: the test file's `config`)")
    add_dlq_parser(commands)
    add_audit_parser(commands)
    return parser


def _check(args: argparse.Namespace) -> int:
    """`busway check`: exit 0 and a summary, or exit 2 and one line saying what is wrong.

    Never a traceback: an unforeseen exception is a bug in busway or an adapter, reported as
    such on one line (and still exit 2: the config could not be checked).
    """
    try:
        plan = plan_or_report(args.config)
    except Exception as exc:
        print(
            f"busway: {args.config}: internal error while checking the config "
            f"({type(exc).__name__}: {one_line(str(exc))}); please report it as a bug",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if plan is None:
        return EXIT_CONFIG
    for note in plan.cycles.notes:
        print(f"{args.config}: note: {note}")
    print(
        f"{args.config}: ok ({len(plan.config.streams)} stream(s), {len(plan.sources)} source(s), "
        f"{len(plan.routes)} route(s), {len(plan.sinks)} sink(s))"
    )
    return 0


def _test(args: argparse.Namespace) -> int:
    try:
        cases = load_cases(args.tests)
    except ConfigError as exc:
        print(f"busway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    plan = plan_or_report(args.config or config_path_of(args.tests, cases))
    if plan is None:
        return EXIT_CONFIG
    routes = {route_config.name: route for route_config, route in plan.routes}
    results = anyio.run(run_cases, cases, plan.config, routes)
    for result in results:
        print(f"{'PASS' if result.passed else 'FAIL'}  {result.name}")
        if result.detail:
            print("\n".join(f"      {line}" for line in result.detail.splitlines()))
    failed = sum(not result.passed for result in results)
    print(f"{len(results) - failed} passed, {failed} failed ({args.tests})")
    return EXIT_FAILURE if failed else 0


@dataclass
class _Run:
    """What `_serve` tells `_run`: whether start-up had completed, and what stopped the bus."""

    started: bool = False
    error: BuswayError | None = None


def _run(args: argparse.Namespace) -> int:
    role = WorkerRole.take()
    configure_logging(
        log_format=args.log_format,
        level=args.log_level,
        worker=role.index if role is not None else None,
    )
    if role is None and args.workers is not None:
        return _run_workers(args)
    try:
        bus = Bus.from_file(args.config) if role is None else _worker_bus(args.config, role)
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    run = _Run()
    channel = WorkerChannel(role) if role is not None else None
    anyio.run(
        _serve,
        bus,
        args.config,
        run,
        channel,
        backend="asyncio",
        backend_options={"use_uvloop": True},
    )
    if run.error is not None:
        if not run.started:
            logger.error("cannot start: %s", _one_line(run.error))
            return EXIT_STARTUP
        logger.error("stopped on error: %s", _one_line(run.error))
        return EXIT_FAILURE
    logger.info("stopped" if run.started else "stopped before start-up completed")
    return 0


def _worker_bus(config_path: str, role: WorkerRole) -> WorkerBus:
    registry = default_registry()
    config = load_config(
        config_path, source_types=registry.source_config, sink_types=registry.sink_config
    )
    try:
        return WorkerBus(config, role)
    except ConfigError as error:
        raise locate_in_file(error, config_path) from None


def _run_workers(args: argparse.Namespace) -> int:
    """`busway run --workers N`: supervise N workers (`busway._cli.supervisor`)."""
    try:
        count = parse_workers(args.workers)
    except ValueError as exc:
        logger.error("%s", exc)
        return EXIT_CONFIG
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    if plan_or_report(args.config) is None:  # a broken config: one line here, not N times
        return EXIT_CONFIG
    log_args = ["--log-format", args.log_format, "--log-level", args.log_level]
    return anyio.run(
        functools.partial(
            supervise,
            args.config,
            config,
            count,
            log_args=log_args,
            pid_file=config.resolve_path(config.pid_file),
            results=_reload_results_path(config),
            write_result=_write_reload_result,
        ),
        backend="asyncio",
    )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


async def _serve(bus: Bus, config_path: str, run: _Run, channel: WorkerChannel | None) -> None:
    """Run `bus` until SIGINT/SIGTERM; a second signal, or a stuck drain, forces the exit.

    A signal while starting (connecting to an unreachable server, waiting for a data_dir)
    stops at once: nothing is running that needs draining. SIGHUP reloads the config file:
    checked first, applied only if valid, and the outcome written for `busway reload`.

    A worker (`channel`) tells its supervisor instead: when it is ready and how each reload
    went; the supervisor owns the pid file and the reload outcome.
    """
    grace = float(bus.config.shutdown_timeout) + 15
    results = _reload_results_path(bus.config)
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                reloads = 0
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if not run.started:
                            logger.warning("SIGHUP while starting: ignored; reload once ready")
                            continue
                        reloads += 1
                        tg.start_soon(_reload, bus, config_path, results, reloads, channel)
                        continue
                    if not run.started:
                        logger.info(
                            "%s received while starting: stopping", signal.Signals(signum).name
                        )
                        tg.cancel_scope.cancel()
                        return
                    if bus.stopping:
                        logger.warning("second %s: stopping now", signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        return
                    logger.info("%s received: stopping", signal.Signals(signum).name)
                    bus.stop()
                    tg.cancel_scope.deadline = anyio.current_time() + grace

            tg.start_soon(watch_signals)
            try:
                async with bus:
                    run.started = True
                    # What the daemon allocated to start lives as long as it does: take it out
                    # of the cyclic GC's generations, so collections triggered by per-message
                    # garbage stay cheap. Process-wide, so the CLI decides it, not `Bus`.
                    gc.freeze()
                    if channel is not None:
                        assert isinstance(bus, WorkerBus)
                        tg.start_soon(channel.listen, bus)
                        channel.send("ready")
                        await bus.wait_until_stopped()
                    else:
                        pid_file = bus.config.resolve_path(bus.config.pid_file)
                        _write_pid(pid_file)
                        try:
                            await bus.wait_until_stopped()
                        finally:
                            pid_file.unlink(missing_ok=True)
                            results.unlink(missing_ok=True)
            except BuswayError as exc:  # reported by `_run`, as one line
                run.error = exc
            tg.cancel_scope.cancel()


async def _reload(
    bus: Bus, config_path: str, results: Path, number: int, channel: WorkerChannel | None
) -> None:
    """Reload the config file into `bus`; log the outcome and write it to `results` (a
    worker: tell its supervisor)."""
    logger.info("SIGHUP: reloading %s", config_path)

    def outcome(path: Path, number: int, code: int, message: str) -> None:
        if channel is None:
            _write_reload_result(path, number, code, message)
        else:
            channel.send("reload", exit=code, message=message)

    try:
        config = load_config(
            config_path,
            source_types=bus.registry.source_config,
            sink_types=bus.registry.sink_config,
        )
        if channel is not None:
            config = channel.role.apply(config)
        report = await bus.reload(config)
    except ConfigError as exc:
        exc = locate_in_file(exc, config_path) if exc.line is None else exc
        message = f"reload rejected, still running the previous config: {exc}"
        logger.error("%s", message)
        outcome(results, number, EXIT_CONFIG, message)
        return
    except BuswayError as exc:
        message = f"reload failed: {exc}"
        logger.error("%s", message)
        outcome(results, number, EXIT_FAILURE, message)
        return
    logger.info("reload done: %s", report)
    outcome(results, number, 0, f"reload done: {report}")


def _reload_results_path(config: Config) -> Path:
    """Where the daemon reports its reloads: beside its pid file (`busway.reload.json`)."""
    pid_file = config.resolve_path(config.pid_file)
    return pid_file.with_name(f"{pid_file.stem}.reload.json")


def _write_reload_result(path: Path, number: int, code: int, message: str) -> None:
    """Replace `path` atomically with the outcome of this process's reload number `number`."""
    entry = {"pid": os.getpid(), "reload": number, "exit": code, "message": message}
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    try:
        temporary.write_text(json.dumps(entry) + "\n")
        os.replace(temporary, path)
    except OSError as exc:
        logger.warning("cannot write the reload outcome to %s: %s", path, exc.strerror)


def _read_reload_result(path: Path) -> dict[str, Any] | None:
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return entry if isinstance(entry, dict) else None


def _write_pid(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def _reload_command(args: argparse.Namespace) -> int:
    """`busway reload`: check the config, SIGHUP the daemon named by its pid file, then wait
    for the outcome the daemon writes beside its pid file and exit with its code: 0 applied,
    2 rejected (the daemon keeps its previous config), 1 failed or no answer in time."""
    if _check(args) != 0:
        print("busway: not reloading: the config is invalid", file=sys.stderr)
        return EXIT_CONFIG
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    pid_file = config.resolve_path(config.pid_file)
    results = _reload_results_path(config)
    try:
        pid = int(pid_file.read_text().strip())
        before = _read_reload_result(results) or {}
        seen = int(before.get("reload", 0)) if before.get("pid") == pid else 0
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(
            f"busway: cannot signal the daemon via {pid_file} ({exc}); is `busway run` running?",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    deadline = time.monotonic() + args.wait
    while True:
        outcome = _read_reload_result(results) or {}
        if outcome.get("pid") == pid and int(outcome.get("reload", 0)) > seen:
            break
        if not process_alive(pid):
            print(f"busway: the daemon (pid {pid}) exited during the reload", file=sys.stderr)
            return EXIT_FAILURE
        if time.monotonic() > deadline:
            print(
                f"busway: sent SIGHUP to busway (pid {pid}) but it reported no outcome within "
                f"{args.wait:g}s (it may still be draining): see its log",
                file=sys.stderr,
            )
            return EXIT_FAILURE
        time.sleep(0.1)
    code = int(outcome.get("exit", EXIT_FAILURE))
    print(f"busway (pid {pid}): {outcome.get('message', '')}", file=sys.stderr if code else None)
    return code


def _schema_command(args: argparse.Namespace) -> int:
    registry = default_registry()
    if args.update_readme:
        print(
            "busway: the config reference moved out of the README: run "
            "`busway schema --update-docs docs/reference/config.md`",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    if args.update_docs:
        path = Path(args.update_docs)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(config_reference(registry))
        print(f"{path}: config reference updated")
    elif args.markdown:
        print(config_reference(registry), end="")
    else:
        print(json.dumps(config_schema(registry), indent=2))
    return 0


def _status_command(args: argparse.Namespace) -> int:
    """`busway status`: read the daemon's /status and print it as a table."""
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    if args.orphans:
        return print_orphans(config)
    if not config.http.listen:
        print("busway: [http] listen is off: the daemon serves no /status", file=sys.stderr)
        return EXIT_CONFIG
    # /status is on the admin listener when there is one, behind the admin token if set.
    host, port = split_listen(config.http.admin_listen or config.http.listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    scheme = "https" if config.http.tls_cert else "http"
    url = f"{scheme}://{host}:{port}/status"
    request = urllib.request.Request(url)
    if config.http.admin_token is not None:
        request.add_header("Authorization", f"Bearer {config.http.admin_token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            report = json.load(response)
    except (OSError, ValueError) as exc:
        print(f"busway: cannot read {url}: {exc}; is `busway run` running?", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_status(report))
    return 0 if report.get("status") == "ready" else EXIT_FAILURE


_COMMANDS = {
    "run": _run,
    "check": _check,
    "test": _test,
    "reload": _reload_command,
    "status": _status_command,
    "schema": _schema_command,
    "dlq": run_dlq,
    "audit": run_audit,
}
