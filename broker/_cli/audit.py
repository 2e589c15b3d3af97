"""`busway audit`: read the audit trail (who sent what, dead letters, replays).

    busway audit busway.toml --principal partner-a --since 1h
    busway audit busway.toml --subject 'orders.>' --kind ingress --json

One line per record, oldest first (`--json`: one JSON object per line). Exit codes: 0 done,
1 the trail cannot be read (no audit stream, NATS unreachable), 2 invalid arguments or config.
"""

from __future__ import annotations

import argparse
import sys

import anyio
import orjson

from busway._cli.dlq import _connected, _moment, _Unreachable
from busway._cli.support import EXIT_CONFIG, EXIT_FAILURE, load_or_report
from busway._config.model import Config
from busway._errors import BusUnavailable
from busway._nats.jetstream import jetstream
from busway._observe.audit_read import AuditError, AuditQuery, iter_audit
from busway._observe.redact import install_redaction, redact

__all__ = ["add_audit_parser", "run_audit"]

_KINDS = ("ingress", "deadletter", "replay")


def add_audit_parser(subcommands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add `audit` to the `busway` command's subcommands."""
    audit = subcommands.add_parser(
        "audit",
        help="read the [audit] trail: ingress, dead letters, replays",
        description="Print audit records, oldest first; every filter given must match.",
    )
    audit.add_argument("config", help="path of the busway TOML file")
    audit.add_argument("--principal", help="the authenticated caller (Busway-Principal)")
    audit.add_argument(
        "--since", type=_moment, help="recorded at or after: 1h, 30m, 2d ago, or an ISO time"
    )
    audit.add_argument("--until", type=_moment, help="recorded at or before (same forms)")
    audit.add_argument("--subject", help="the message's subject; wildcards allowed (orders.>)")
    audit.add_argument("--kind", choices=_KINDS, help="only this kind of record")
    audit.add_argument("--limit", type=int, help="print at most N records")
    audit.add_argument("--json", action="store_true", help="one JSON object per line")


def run_audit(args: argparse.Namespace) -> int:
    """Run `busway audit`; returns the exit code."""
    config = load_or_report(args.config)
    if config is None:
        return EXIT_CONFIG
    if not config.audit.enabled:
        print(
            f"busway: {args.config} has no audit trail: set [audit] enabled = true (and run "
            "the daemon with it) to record one",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    install_redaction(config.redaction)
    query = AuditQuery(
        principal=args.principal,
        since=args.since,
        until=args.until,
        subject=args.subject,
        kind=args.kind,
        limit=args.limit if args.limit and args.limit > 0 else None,
    )
    try:
        result: int = anyio.run(_print, config, query, args.json, backend="asyncio")
    except (AuditError, _Unreachable, BusUnavailable) as exc:
        print(f"busway: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return result


async def _print(config: Config, query: AuditQuery, as_json: bool) -> int:
    async with _connected(config) as client:
        js = jetstream(client, window=16)
        async for record in iter_audit(client, js, config, query):
            print(orjson.dumps(record).decode() if as_json else redact(_line(record)))
    return 0


def _line(record: dict[str, object]) -> str:
    """`<time> <kind> <who> <what>`: the fields a reader scans for, the rest as key=value."""
    kind = record.get("kind")
    head = [str(record.get("time", "?")), f"{kind!s:<10}"]
    if kind == "ingress":
        who = record.get("principal") or "-"
        what = [f"source={record.get('source')}", f"subject={record.get('subject')}"]
        what += [f"id={record.get('message_id')}", f"client={record.get('client') or '-'}"]
    elif kind == "replay":
        who = f"{record.get('user')}@{record.get('host')}"
        what = [f"letter={record.get('dead_letter_seq')}", f"to={record.get('target')}"]
        what += [f"why={record.get('why') or '-'}"]
    else:
        who = record.get("principal") or "-"
        what = [f"component={record.get('component')}", f"reason={record.get('reason')}"]
        what += [f"subject={record.get('subject')}", f"error={record.get('error')}"]
    return " ".join([*head, str(who), *what])
