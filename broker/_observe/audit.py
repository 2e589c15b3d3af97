"""The audit trail: who put what on the bus, and what was dead-lettered or replayed, and why.

With `[audit] enabled`, busway writes one small JSON record per event to its audit stream:

* `ingress`: a message a source stored (principal, source, subject, message id, time, client
  address, stream and sequence);
* `deadletter`: a message a route, sink or source gave up on (component, reason, error,
  original place);
* `replay`: a dead letter replayed by `busway dlq replay` (the operator's user and host, the
  `--why` text, where the copy went).

Each record is published with its own deterministic `Nats-Msg-Id` (`audit:<kind>:...` built
from the id of what it records), so a publish retried after a crash or a redelivery is
dropped by the audit stream instead of recorded twice.

Cost: an ingress or dead-letter record is one pipelined publish sent after the message's own
PubAck, never waited for; a lost one (the audit stream full, NATS gone) is logged and counted
as `busway_errors_total{reason="audit"}` of the component, and never fails the message. So
the trail is as complete as NATS is available: a process killed between a message's PubAck and
its record's send loses that record (see docs/security.md, "Audit trail").
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import orjson

from busway._components import INGRESS_CLIENT
from busway._nats.streams import publish_unawaited

if TYPE_CHECKING:
    from busway._config.model import AuditConfig
    from busway._nats.types import JetStream
    from busway._observe.metrics import ComponentStats

__all__ = ["AuditTrail", "audit_time", "replay_record"]

logger = logging.getLogger("busway.audit")

_PRINCIPAL = "Busway-Principal"
_ISSUER = "Busway-Principal-Issuer"


def audit_time() -> str:
    """Now, as the RFC 3339 UTC time every record carries (`2026-01-31T12:00:00.123456Z`)."""
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


class AuditTrail:
    """Publishes audit records to `<subject_prefix>.<kind>.<component>` without waiting."""

    __slots__ = ("_js", "_prefix")

    def __init__(self, js: JetStream, config: AuditConfig) -> None:
        self._js = js
        self._prefix = config.subject_prefix

    async def ingress(
        self,
        *,
        source: str,
        subject: str,
        headers: Mapping[str, str] | None,
        stream: str | None,
        sequence: int | None,
        duplicate: bool,
        stats: ComponentStats,
    ) -> None:
        """Record a message `source` stored (after its PubAck; a request-reply request has
        no PubAck of its own to tell its stream and sequence)."""
        headers = headers or {}
        message_id = headers.get("Nats-Msg-Id") or f"{stream}:{sequence}"
        record: dict[str, object] = {
            "kind": "ingress",
            "time": audit_time(),
            "source": source,
            "subject": subject,
            "message_id": message_id,
            "principal": headers.get(_PRINCIPAL),
            "issuer": headers.get(_ISSUER),
            "client": INGRESS_CLIENT.get(),
            "stream": stream,
            "seq": sequence,
        }
        if duplicate:
            record["duplicate"] = True
        trace = _trace_id(headers)
        if trace:
            record["trace_id"] = trace
        await self._publish("ingress", source, f"audit:ingress:{message_id}", record, stats)

    async def requested(
        self, source: str, subject: str, headers: Mapping[str, str], *, stats: ComponentStats
    ) -> None:
        """Record a request-reply request `source` stored (`SourceContext.request`)."""
        await self.ingress(
            source=source,
            subject=subject,
            headers=headers,
            stream=None,
            sequence=None,
            duplicate=False,
            stats=stats,
        )

    async def dead_letter(
        self,
        *,
        component: str,
        kind: str,
        headers: Mapping[str, str],
        stats: ComponentStats,
    ) -> None:
        """Record a dead letter from the `headers` it was stored with (`dead_letter_headers`
        or `SourceContext.dead_letter`): what failed, where, and why."""
        record: dict[str, object] = {
            "kind": "deadletter",
            "time": audit_time(),
            "component": component,
            "component_kind": kind,
            "reason": headers.get("Busway-Error-Reason"),
            "error": headers.get("Busway-Error"),
            "subject": headers.get("Busway-Original-Subject"),
            "message_id": headers.get("Busway-Original-Msg-Id"),
            "stream": headers.get("Busway-Original-Stream"),
            "seq": _int(headers.get("Busway-Original-Sequence")),
            "origin": headers.get("Busway-Origin"),
            "attempts": _int(headers.get("Busway-Attempts")),
            "principal": headers.get(_PRINCIPAL),
        }
        trace = _trace_id(headers)
        if trace:
            record["trace_id"] = trace
        letter_id = headers.get("Nats-Msg-Id") or f"{component}:{audit_time()}"
        await self._publish("deadletter", component, f"audit:{letter_id}", _compact(record), stats)

    async def _publish(
        self,
        kind: str,
        component: str,
        message_id: str,
        record: Mapping[str, object],
        stats: ComponentStats,
    ) -> None:
        subject = f"{self._prefix}.{kind}.{component}"

        def lost(error: BaseException) -> None:
            stats.count_error("audit")
            logger.warning("audit record %s not stored: %s", message_id, error)

        await publish_unawaited(self._js, subject, orjson.dumps(_compact(record)), message_id, lost)


def replay_record(
    *,
    user: str,
    host: str,
    why: str | None,
    component: str,
    dead_letter_stream: str,
    dead_letter_seq: int,
    reason: str,
    message_id: str | None,
    original_subject: str | None,
    target: str,
    stored_stream: str,
    stored_seq: int,
) -> dict[str, object]:
    """The record of one replayed dead letter (`busway dlq replay`)."""
    return _compact(
        {
            "kind": "replay",
            "time": audit_time(),
            "user": user,
            "host": host,
            "why": why,
            "component": component,
            "dead_letter_stream": dead_letter_stream,
            "dead_letter_seq": dead_letter_seq,
            "reason": reason,
            "message_id": message_id,
            "subject": original_subject,
            "target": target,
            "stream": stored_stream,
            "seq": stored_seq,
        }
    )


def _compact(record: Mapping[str, object]) -> dict[str, object]:
    """`record` without its empty fields: records stay small, and absent means unknown."""
    return {key: value for key, value in record.items() if value is not None}


def _trace_id(headers: Mapping[str, str]) -> str | None:
    """The trace id of a valid-looking `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`)."""
    parent = headers.get("traceparent")
    if parent is None or len(parent) < 55 or parent[2] != "-":
        return None
    return parent[3:35]


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None
