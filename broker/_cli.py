"""The `busway` command: a thin layer over `Bus` and `load_config`.

    busway run busway.toml      run until SIGINT/SIGTERM, then stop gracefully (exit 0)
    busway check busway.toml    decode and compile everything without connecting
    busway test routes.test.toml  run route test cases against the compiled routes, no broker
    busway reload busway.toml   check the config, then SIGHUP the running daemon to reload it
    busway status busway.toml   per component: state, rates, backlog, circuit, last error
    busway schema [--markdown]  the config's JSON Schema (editors) or Markdown reference
    busway dlq list|show|replay|purge busway.toml  inspect, replay or purge dead letters

Exit codes: 0 success, 1 start-up or run-time failure, 2 invalid configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import anyio

from busway import __version__
from busway._bus import Bus
from busway._cli_support import (
    EXIT_CONFIG,
    EXIT_FAILURE,
    load_or_report,
    one_line,
    plan_or_report,
)
from busway._config import load_config, locate_in_file, split_listen
from busway._dlq_cli import add_dlq_parser, run_dlq
from busway._errors import BuswayError, ConfigError, StartupError
from busway._logging import configure_logging
from busway._registry import default_registry
from busway._route_tests import config_path_of, load_cases, run_cases
from busway._schema import (
    REFERENCE_END,
    REFERENCE_START,
    config_reference,
    config_schema,
    embed_reference,
)
from busway._status import format_status

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
    check = commands.add_parser(
        "check", help="validate a config file: decode, compile expressions, build adapters"
    )
    check.add_argument("config", help="path of the busway TOML file")
    schema = commands.add_parser(
        "schema", help="print the config's JSON Schema (for editors) or its Markdown reference"
    )
    schema.add_argument("--markdown", action="store_true", help="the reference, as Markdown")
    schema.add_argument(
        "--update-readme",
        metavar="README",
        help="rewrite the reference between the config-reference markers of this file",
    )
    status = commands.add_parser(
        "status", help="show the running daemon's components: state, rates, backlog, errors"
    )
    status.add_argument("config", help="path of the busway TOML file the daemon runs")
    status.add_argument("--json", action="store_true", help="print the raw /status JSON")
    reload = commands.add_parser(
        "reload", help="check a config, then make the running daemon reload it (SIGHUP)"
    )
    reload.add_argument("config", help="path of the busway TOML file the daemon runs")
    test = commands.add_parser(
        "test", help="run route test cases (inputs and expected outputs) without a broker"
    )
    test.add_argument("tests", help="path of the test TOML file")
    test.add_argument("--config", help="config file to test (default: the test file's `config`)")
    add_dlq_parser(commands)
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


def _run(args: argparse.Namespace) -> int:
    configure_logging(log_format=args.log_format, level=args.log_level)
    try:
        bus = Bus.from_file(args.config)
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return EXIT_CONFIG
    try:
        anyio.run(_serve, bus, args.config, backend="asyncio", backend_options={"use_uvloop": True})
    except StartupError as exc:
        logger.error("cannot start: %s", exc)
        return EXIT_FAILURE
    except BuswayError as exc:
        logger.error("stopped on error: %s", exc)
        return EXIT_FAILURE
    logger.info("stopped")
    return 0


async def _serve(bus: Bus, config_path: str) -> None:
    """Run `bus` until SIGINT/SIGTERM; a second signal, or a stuck drain, forces the exit.

    SIGHUP reloads the config file: checked first, applied only if valid.
    """
    grace = float(bus.config.shutdown_timeout) + 15
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with anyio.create_task_group() as tg:

            async def watch_signals() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        tg.start_soon(_reload, bus, config_path)
                        continue
                    if bus.stopping:
                        logger.warning("second %s: stopping now", signal.Signals(signum).name)
                        tg.cancel_scope.cancel()
                        return
                    logger.info("%s received: stopping", signal.Signals(signum).name)
                    bus.stop()
                    tg.cancel_scope.deadline = anyio.current_time() + grace

            tg.start_soon(watch_signals)
            async with bus:
                pid_file = bus.config.resolve_path(bus.config.pid_file)
                _write_pid(pid_file)
                try:
                    await bus.wait_until_stopped()
                finally:
                    pid_file.unlink(missing_ok=True)
            tg.cancel_scope.cancel()


async def _reload(bus: Bus, config_path: str) -> None:
    logger.info("SIGHUP: reloading %s", config_path)
    try:
        config = load_config(
            config_path,
            source_types=bus.registry.source_config,
            sink_types=bus.registry.sink_config,
        )
        report = await bus.reload(config)
    except ConfigError as exc:
        exc = locate_in_file(exc, config_path) if exc.line is None else exc
        logger.error("reload rejected, still running the previous config: %s", exc)
        return
    except BuswayError as exc:
        logger.error("reload failed: %s", exc)
        return
    logger.info("reload done: %s", report)


def _write_pid(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")


def _reload_command(args: argparse.Namespace) -> int:
    """`busway reload`: check the config, then SIGHUP the daemon named by its pid file."""
    if _check(args) != 0:
        print("busway: not reloading: the config is invalid", file=sys.stderr)
        return EXIT_CONFIG
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    pid_file = config.resolve_path(config.pid_file)
    try:
        pid = int(pid_file.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        print(
            f"busway: cannot signal the daemon via {pid_file} ({exc}); is `busway run` running?",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    print(f"sent SIGHUP to busway (pid {pid}); its log says what the reload changed")
    return 0


def _schema_command(args: argparse.Namespace) -> int:
    registry = default_registry()
    if args.update_readme:
        path = Path(args.update_readme)
        text = path.read_text()
        updated = embed_reference(text, config_reference(registry))
        if updated is None:
            print(f"busway: {path} has no {REFERENCE_START} ... {REFERENCE_END}", file=sys.stderr)
            return EXIT_FAILURE
        path.write_text(updated)
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
    if not config.http.listen:
        print("busway: [http] listen is off: the daemon serves no /status", file=sys.stderr)
        return EXIT_CONFIG
    host, port = split_listen(config.http.listen)
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    scheme = "https" if config.http.tls_cert else "http"
    url = f"{scheme}://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
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
}
