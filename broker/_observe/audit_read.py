"""Reading the audit trail back: records by time, principal, subject and kind (`busway audit`).

The first record at or after `since` is found with one `STREAM.MSG.GET` by start time (the
server's own index, not a walk from the start of a stream kept for months); from there the
walk asks for "the next message at or after sequence n on the audit subjects", one record in
memory at a time, and stops at `until` (stored times only grow along a stream) or at the
stream's last sequence as it was when the walk began. No consumer is left behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

import orjson

from busway._config.model import Config
from busway._errors import JetStreamError
from busway._nats.streams import first_sequence_since, stored_message, stream_state
from busway.routers.subject import covers

if TYPE_CHECKING:
    from busway._nats.types import JetStream, NatsClient

__all__ = ["AuditError", "AuditQuery", "iter_audit"]


class AuditError(Exception):
    """The audit trail cannot be read (no audit stream, JetStream refused); says what to do."""


@dataclass(frozen=True, kw_only=True)
class AuditQuery:
    """Which records to read; every given filter must match."""

    principal: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    subject: str | None = None
    """The message's subject; wildcards allowed (`orders.>`)."""
    kind: str | None = None
    """`ingress`, `deadletter` or `replay`."""
    limit: int | None = None

    def matches(self, record: dict[str, object]) -> bool:
        """Whether `record` passes every filter given (time is checked by the walk)."""
        if self.principal is not None and record.get("principal") != self.principal:
            return False
        if self.kind is not None and record.get("kind") != self.kind:
            return False
        if self.subject is not None:
            subject = record.get("subject")
            if not isinstance(subject, str) or not covers(self.subject, subject):
                return False
        return True


async def iter_audit(
    client: NatsClient, js: JetStream, config: Config, query: AuditQuery
) -> AsyncIterator[dict[str, object]]:
    """The matching records, oldest first, each with its stream sequence as `audit_seq`."""
    stream = config.audit.stream
    pattern = f"{config.audit.subject_prefix}.>"
    try:
        state = await stream_state(js, stream)
        first: int | None = max(state.first_seq, 1)
        if query.since is not None:
            first = await first_sequence_since(client, stream, query.since)
        found = 0
        seq = first
        while seq is not None and seq <= state.last_seq:
            raw = await stored_message(js, stream, seq, subject=pattern, next=True)
            if raw is None or raw.seq > state.last_seq:
                return
            seq = raw.seq + 1
            if query.until is not None and raw.time is not None and raw.time > query.until:
                return
            try:
                record = orjson.loads(raw.data)
            except orjson.JSONDecodeError:
                continue  # not ours: someone else published on the audit subjects
            if not isinstance(record, dict) or not query.matches(record):
                continue
            record["audit_seq"] = raw.seq
            yield record
            found += 1
            if query.limit is not None and found >= query.limit:
                return
    except JetStreamError as exc:
        if exc.not_found:
            raise AuditError(
                f"stream {stream!r} does not exist on this server: is [audit] enabled, and "
                "has the daemon run with it?"
            ) from exc
        raise AuditError(f"JetStream refused to read stream {stream!r}: {exc}") from exc
