"""`busway dlq`: list, show, replay and purge dead letters from the command line.

    busway dlq list busway.toml --component orders --reason validation --since 1h
    busway dlq show busway.toml 42
    busway dlq replay busway.toml --component orders --to orders.retry
    busway dlq purge busway.toml --component orders --until 2026-01-31

It connects to the config's `[nats] servers`, or, when busway runs its embedded server, to
`[nats] listen` of the running daemon. Output is a table, or with `--json` JSON (one object per
line for `list`). Exit codes: 0 done, 1 something failed (a replay, the connection), 2 invalid
configuration or arguments.
"""

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import msgspec

from busway._cli.support import EXIT_CONFIG, EXIT_FAILURE, load_or_report
from busway._config.model import Config, split_listen
from busway._dlq.read import (
    DeadLetter,
    DeadLetterError,
    DeadLetterFilters,
    ReplayReport,
    get_dead_letter,
    iter_dead_letters,
)
from busway._dlq.replay import purge_dead_letters, replay_dead_letters
from busway._errors import BusUnavailable, StartupError
from busway._nats.embedded import local_client
from busway._nats.jetstream import close_connection, connect_once, jetstream, nats_auth
from busway._nats.types import JetStream, NatsClient
from busway._observe.redact import install_redaction, redact
from busway.routers.durations import parse_duration

__all__ = ["add_dlq_parser", "run_dlq"]

_LIST_LIMIT = 100
_ERROR_WIDTH = 60
_PUBLISH_WINDOW = 4000  # replays in flight at once (nats-py's own default)


def add_dlq_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `dlq list|show|replay|purge` to the `busway` command's subcommands."""
    dlq = subcommands.add_parser(
        "dlq",
        help="list, show, replay or purge dead letters",
        description="Inspect and act on the dead-letter stream of a busway deployment.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)

    listing = actions.add_parser("list", help="list dead letters, oldest first")
    _common(listing)
    _filters(listing)
    listing.add_argument(
        "--limit",
        type=int,
        default=_LIST_LIMIT,
        help=f"show at most N (default {_LIST_LIMIT}; 0 for all)",
    )

    show = actions.add_parser("show", help="show one dead letter: headers and body")
    _common(show)
    show.add_argument("seq", type=int, help="the dead letter's sequence number (from `list`)")
    show.add_argument("--stream", help="stream to read (default: the [dead_letter] stream)")

    replay = actions.add_parser(
        "replay",
        help="republish dead letters to their original subject (or --to), then delete them",
        description="Republish dead letters, then delete them. A copy sent to its original "
        "subject is processed by the route or sink that dead-lettered it alone; the other "
        "consumers of that subject ack it unprocessed.",
    )
    _common(replay)
    _filters(replay)
    replay.add_argument(
        "--to",
        metavar="SUBJECT",
        help="publish to SUBJECT instead (every consumer of SUBJECT processes the copy)",
    )
    replay.add_argument("--dry-run", action="store_true", help="only say what would happen")
    replay.add_argument("--limit", type=int, help="replay at most N")
    replay.add_argument(
        "--why",
        metavar="TEXT",
        help="why you replay (a ticket, a fix): recorded with your user in the [audit] trail",
    )

    purge = actions.add_parser("purge", help="delete dead letters")
    _common(purge)
    _filters(purge)
    purge.add_argument(
        "--all", action="store_true", help="delete every dead letter (needed without a filter)"
    )
    purge.add_argument("--dry-run", action="store_true", help="only count what would go")
    purge.add_argument("--limit", type=int, help="delete at most N")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="path of the busway TOML file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def _filters(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("filters (all given must match)")
    group.add_argument(
        "--component",
        "--route",
        "--sink",
        "--source",
        dest="component",
        metavar="NAME",
        help="the route, sink or source that dead-lettered",
    )
    group.add_argument("--reason", help="error reason, e.g. decode, expression, validation")
    group.add_argument("--subject", help="original subject; wildcards allowed (orders.*, orders.>)")
    group.add_argument(
        "--since", type=_moment, help="stored at or after: 1h, 30m, 2d ago, or an ISO time (UTC)"
    )
    group.add_argument("--until", type=_moment, help="stored at or before (same forms)")
    group.add_argument(
        "--error", dest="error_contains", metavar="TEXT", help="error message contains TEXT"
    )
    group.add_argument(
        "--seq",
        dest="sequences",
        type=int,
        action="append",
        metavar="N",
        help="this dead letter (repeatable)",
    )


def _moment(text: str) -> datetime:
    """`1h` (ago) or an ISO 8601 time; a time without an offset is UTC."""
    try:
        return datetime.now(UTC) - timedelta(seconds=float(parse_duration(text)))
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a duration ago (30m, 1h, 2d) or an ISO time (2026-01-31T12:00Z), "
            f"got {text!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def run_dlq(args: argparse.Namespace) -> int:
    """Run `busway dlq ACTION`; returns the exit code."""
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    install_redaction(config.redaction)  # [redaction] what `show` and `list` print is masked
    if args.dlq_command == "purge" and not args.all and not any(_given_filters(args).values()):
        print("busway: purge needs a filter (--component, --reason, ...) or --all", file=sys.stderr)
        return EXIT_CONFIG
    try:
        result: int = anyio.run(_run, args, config, backend="asyncio")
    except (DeadLetterError, _Unreachable) as exc:
        print(f"busway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except ValueError as exc:
        print(f"busway: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return result


def _given_filters(args: argparse.Namespace) -> DeadLetterFilters:
    """The filters given on the command line (`show` has none)."""
    return {
        "component": getattr(args, "component", None),
        "reason": getattr(args, "reason", None),
        "subject": getattr(args, "subject", None),
        "since": getattr(args, "since", None),
        "until": getattr(args, "until", None),
        "error_contains": getattr(args, "error_contains", None),
        "sequences": getattr(args, "sequences", None),
    }


async def _run(args: argparse.Namespace, config: Config) -> int:
    async with _connected(config) as client:
        js = jetstream(client, window=_PUBLISH_WINDOW)
        filters = _given_filters(args)
        limit = getattr(args, "limit", None) or None
        if args.dlq_command == "list":
            return await _list(js, config, filters, limit, args.json)
        if args.dlq_command == "show":
            letter = await get_dead_letter(js, config, args.seq, stream=args.stream)
            if letter is None:
                stream = args.stream or config.dead_letter.stream
                print(
                    f"busway: no message with sequence {args.seq} in stream {stream}",
                    file=sys.stderr,
                )
                return EXIT_FAILURE
            print(redact(_json(letter) if args.json else _details(letter)))
            return 0
        if args.dlq_command == "replay":
            report = await replay_dead_letters(
                js,
                config,
                to_subject=args.to,
                dry_run=args.dry_run,
                limit=limit,
                why=args.why,
                **filters,
            )
            _print_report(report, args.json)
            return EXIT_FAILURE if report.failed or report.unaudited else 0
        count = await purge_dead_letters(js, config, dry_run=args.dry_run, limit=limit, **filters)
        if args.json:
            print(msgspec.json.encode({"purged": count, "dry_run": args.dry_run}).decode())
        else:
            verb = "would purge" if args.dry_run else "purged"
            print(f"{verb} {count} dead letter(s)")
        return 0


async def _list(
    js: JetStream,
    config: Config,
    filters: DeadLetterFilters,
    limit: int | None,
    as_json: bool,
) -> int:
    shown = 0
    if not as_json:
        print(_row("SEQ", "STORED (UTC)", "COMPONENT", "KIND", "REASON", "TRIES", "FROM", "ERROR"))
    async for letter in iter_dead_letters(js, config, limit=limit, **filters):
        shown += 1
        if as_json:
            print(redact(_json(letter)))
            continue
        print(
            _row(
                str(letter.seq),
                letter.time.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S"),
                letter.component,
                letter.kind,
                letter.reason,
                "" if letter.attempts is None else str(letter.attempts),
                _from(letter),
                _shorten(redact(letter.error), _ERROR_WIDTH),
            )
        )
    if not as_json:
        more = f" (the first {limit}: --limit 0 shows all)" if limit and shown == limit else ""
        print(f"{shown} dead letter(s){more}")
    return 0


def _row(*cells: str) -> str:
    widths = (8, 19, 20, 6, 12, 5, 30)
    padded = [cell.ljust(width) for cell, width in zip(cells, widths, strict=False)]
    return "  ".join([*padded, *cells[len(widths) :]]).rstrip()


def _from(letter: DeadLetter) -> str:
    if letter.original_subject is None:
        return letter.origin or ""
    if letter.original_stream is None:
        return letter.original_subject
    return f"{letter.original_subject} ({letter.original_stream}#{letter.original_seq})"


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _details(letter: DeadLetter) -> str:
    lines = [
        f"dead letter {letter.seq} in stream {letter.stream} (subject {letter.subject})",
        f"  stored:        {letter.time.astimezone(UTC).isoformat()}",
        f"  component:     {letter.component} ({letter.kind})",
        f"  reason:        {letter.reason}",
        f"  error:         {letter.error}",
    ]
    if letter.original_subject is not None:
        lines.append(
            f"  original:      {letter.original_subject}, stream {letter.original_stream} "
            f"seq {letter.original_seq}"
        )
    if letter.origin is not None:
        lines.append(f"  origin:        {letter.origin}")
    if letter.attempts is not None:
        lines.append(f"  attempts:      {letter.attempts}")
    if letter.first_failed_at is not None and letter.failed_at is not None:
        lines.append(
            f"  failed:        first {letter.first_failed_at.astimezone(UTC).isoformat()}, "
            f"last {letter.failed_at.astimezone(UTC).isoformat()}"
        )
    lines.append(f"  replay count:  {letter.replay_count}")
    lines.append("headers:")
    lines += [f"  {key}: {value}" for key, value in letter.headers.items()]
    try:
        text = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        lines.append(f"body ({len(letter.body)} bytes, not UTF-8; base64):")
        lines.append(base64.b64encode(letter.body).decode("ascii"))
    else:
        lines.append(f"body ({len(letter.body)} bytes):")
        lines.append(text)
    return "\n".join(lines)


def _json(letter: DeadLetter) -> str:
    """One line of JSON; the body as text, or as `body_base64` when it is not UTF-8."""
    document: dict[str, Any] = msgspec.to_builtins(letter)
    del document["body"]
    try:
        document["body"] = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        document["body_base64"] = base64.b64encode(letter.body).decode("ascii")
    return msgspec.json.encode(document).decode()


def _print_report(report: ReplayReport, as_json: bool) -> None:
    if as_json:
        print(msgspec.json.encode(report).decode())
        return
    verb = "would replay" if report.dry_run else "replayed"
    for outcome in report.replayed:
        print(f"{verb:<12}  {outcome.seq:<8}  {outcome.component} -> {outcome.target}")
    for outcome in report.skipped:
        print(f"{'skipped':<12}  {outcome.seq:<8}  {outcome.component}: {outcome.detail}")
    for outcome in report.failed:
        print(f"{'FAILED':<12}  {outcome.seq:<8}  {outcome.component}: {outcome.detail}")
    for outcome in report.unaudited:
        print(f"{'UNAUDITED':<12}  {outcome.seq:<8}  {outcome.component}: {outcome.detail}")
    print(
        f"{verb} {len(report.replayed)}, failed {len(report.failed)}, skipped {len(report.skipped)}"
    )


class _Unreachable(Exception):
    """No NATS server answers where the config says it is."""


@asynccontextmanager
async def _connected(config: Config) -> AsyncIterator[NatsClient]:
    """A NATS connection for the config: its servers, or the running daemon's embedded one."""
    try:
        options = nats_auth(config.nats, config.resolve_path)
    except StartupError as exc:
        raise _Unreachable(str(exc)) from None
    servers = config.nats.servers
    embedded = servers is None
    if servers is None:
        host, port = split_listen(config.nats.listen)
        if port == 0:
            raise _Unreachable(
                "[nats] listen uses port 0 (a random port), so the running daemon's embedded "
                "server cannot be found: set a fixed port, or [nats] servers"
            )
        data_dir = config.resolve_path(config.nats.data_dir)
        url, options = local_client(config.nats, data_dir, host, port, options)
        servers = [url]
    try:
        client = await connect_once(
            servers,
            name=f"{config.nats.name}-dlq",
            connect_timeout=float(config.nats.connect_timeout),
            auth=options,
        )
    except BusUnavailable as exc:
        where = ", ".join(servers)
        if embedded:
            raise _Unreachable(
                f"nothing listens on {where} ([nats] listen): busway runs an embedded "
                "nats-server only while `busway run` is running; start the daemon for this "
                "config first"
            ) from exc
        raise _Unreachable(f"cannot connect to NATS at {where} ([nats] servers): {exc}") from exc
    try:
        yield client
    finally:
        await close_connection(client)
