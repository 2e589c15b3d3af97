"""`busway status` as a table: one line per component, the figures an operator looks at first."""

from __future__ import annotations

from typing import Any

__all__ = ["format_status"]

_COLUMNS = (
    ("COMPONENT", lambda c: c["name"]),
    ("KIND", lambda c: c["kind"]),
    ("STATE", lambda c: "ready" if c["ready"] else "NOT READY"),
    ("IN/s", lambda c: f"{c['rate_in']:g}"),
    ("OUT/s", lambda c: f"{c['rate_out']:g}"),
    ("PENDING", lambda c: str(c.get("pending", "-"))),
    ("ACK-PENDING", lambda c: str(c.get("ack_pending", "-"))),
    ("REDELIVERED", lambda c: str(c.get("redelivered", "-"))),
    ("DEAD", lambda c: str(c["dead_lettered"])),
    ("CIRCUIT", lambda c: c.get("circuit", "-")),
)


def format_status(report: dict[str, Any]) -> str:
    """The /status JSON as aligned columns, then why anything is not ready, then the last
    error of each component that has one."""
    rows = [[title for title, _ in _COLUMNS]]
    rows += [[cell(component) for _, cell in _COLUMNS] for component in report["components"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = [f"busway: {report['status']} (nats {'up' if report['nats'] else 'DOWN'})"]
    lines += [
        "  ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    not_ready = report.get("not_ready") or {}
    if not_ready:
        lines.append("")
        lines += [f"not ready: {name}: {reason}" for name, reason in not_ready.items()]
    errors = [c for c in report["components"] if c.get("last_error")]
    if errors:
        lines.append("")
        lines += [
            f"{c['kind']} {c['name']}: last error at {c['last_error_at']}: {c['last_error']}"
            for c in errors
        ]
    return "\n".join(lines)
