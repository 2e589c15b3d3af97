"""The status report: what `Bus.status()` returns, `/status` serves and `busway status` prints.

`StatusReport` and `ComponentStatus` are the typed report an embedding application reads;
`msgspec.to_builtins(report)` is the `/status` JSON, key for key: keys that do not apply to a
component (`circuit` for a route, the consumer backlog for a source) are left out, not null.
`format_status` turns that JSON, as the CLI reads it from a daemon, into a table.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

__all__ = ["ComponentStatus", "StatusReport", "format_status"]


class ComponentStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One source, route or sink: its counters since start-up, rates, backlog and last error.

    Counters are those of `ComponentStats` (received, published, filtered, dead-lettered,
    retried). Fields with a None default apply to some components only and are absent from
    the JSON when None.
    """

    kind: Literal["source", "route", "sink"]
    name: str
    ready: bool
    """Started, and neither stalled nor failing; `StatusReport.reason` says why not."""
    received: int
    published: int
    filtered: int
    dead_lettered: int
    retried: int
    in_flight: int
    """Messages taken and not yet settled."""
    rate_in: float
    """Messages received per second over the last sampling interval (5 s)."""
    rate_out: float
    errors: dict[str, int]
    """Failures by reason since start-up."""
    last_error: str | None
    last_error_at: str | None
    """When `last_error` happened: ISO 8601, UTC."""
    circuit: str | None = None
    """Sinks: the circuit breaker's state (`closed`, `open`, `half_open`)."""
    consumer_error: str | None = None
    """Routes and sinks: why JetStream could not report the consumer's backlog."""
    pending: int | None = None
    """Routes and sinks: messages in the stream not yet delivered to this consumer."""
    ack_pending: int | None = None
    """Routes and sinks: messages delivered and not yet acknowledged."""
    redelivered: int | None = None
    """Routes and sinks: messages delivered more than once and not yet acknowledged."""

    @property
    def key(self) -> str:
        """`kind:name`, the component's name among readiness checks (`StatusReport.not_ready`)."""
        return f"{self.kind}:{self.name}"


class StatusReport(msgspec.Struct, frozen=True, kw_only=True):
    """The whole bus: ready or not and why, the NATS connection, and every component."""

    status: Literal["ready", "not ready"]
    nats: bool
    """True while the NATS connection is up."""
    not_ready: dict[str, str]
    """Each failing readiness check (`nats`, `jetstream`, `kind:name`) and why it fails."""
    components: list[ComponentStatus]

    @property
    def ready(self) -> bool:
        """True when every readiness check passes (what `/readyz` answers 200 for)."""
        return self.status == "ready"

    def component(self, kind: str, name: str) -> ComponentStatus | None:
        """The component `kind` (`source`, `route`, `sink`) named `name`, if running."""
        return next((c for c in self.components if c.kind == kind and c.name == name), None)

    def reason(self, component: ComponentStatus) -> str | None:
        """Why `component` is not ready; None when it is."""
        return self.not_ready.get(component.key)


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
