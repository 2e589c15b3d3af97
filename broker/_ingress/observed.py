"""A source's publisher with the audit trail and the ingress span around each publish.

Used only when `[audit]` or `[tracing]` is enabled: otherwise sources get the plain
publisher and pay nothing. Every source is covered without an adapter doing anything: HTTP,
files, databases, and an application's own source. A publish to the dead-letter prefix
(`SourceContext.dead_letter`) is recorded as a dead letter, everything else as ingress.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

from busway._components import PublishAck, Publisher
from busway._observe.audit import AuditTrail
from busway._observe.metrics import ComponentStats

if TYPE_CHECKING:
    from busway._observe.spans import Spans

__all__ = ["ObservedPublisher"]


class ObservedPublisher:
    """Wraps one source's `Publisher`: records what it stored (see the module docstring)."""

    def __init__(
        self,
        inner: Publisher,
        *,
        source: str,
        stats: ComponentStats,
        audit: AuditTrail | None,
        spans: Spans | None = None,
        dead_letter_prefix: str,
    ) -> None:
        self._inner = inner
        self._spans = spans
        self._source = source
        self._stats = stats
        self._audit = audit
        self._dead_letters = dead_letter_prefix + "."

    async def publish(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> PublishAck:
        """Store `data` on `subject` (see `Publisher.publish`), then record it."""
        headers, span = self._traced(subject, headers)
        try:
            ack = await self._inner.publish(subject, data, headers=headers)
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span)
        await self._record(subject, headers, ack)
        return ack

    async def publish_pipelined(
        self, subject: str, data: bytes, *, headers: Mapping[str, str] | None = None
    ) -> Awaitable[PublishAck]:
        """Send now; the result yields the PubAck once stored, and records it then."""
        headers, span = self._traced(subject, headers)
        try:
            confirm = await self._inner.publish_pipelined(subject, data, headers=headers)
        except BaseException as exc:
            self._end(span, exc)
            raise
        return self._confirmed(confirm, subject, headers, span)

    async def _confirmed(
        self,
        confirm: Awaitable[PublishAck],
        subject: str,
        headers: Mapping[str, str] | None,
        span: Any,
    ) -> PublishAck:
        try:
            ack = await confirm
        except BaseException as exc:
            self._end(span, exc)
            raise
        self._end(span)
        await self._record(subject, headers, ack)
        return ack

    def _traced(
        self, subject: str, headers: Mapping[str, str] | None
    ) -> tuple[Mapping[str, str] | None, Any]:
        """The headers with the ingress span's context, and the span (None if none)."""
        if self._spans is None or subject.startswith(self._dead_letters):
            return headers, None
        return self._spans.ingress(self._source, subject, dict(headers) if headers else None)

    def _end(self, span: Any, error: BaseException | None = None) -> None:
        if span is not None and self._spans is not None:
            self._spans.end(span, error)

    async def _record(
        self, subject: str, headers: Mapping[str, str] | None, ack: PublishAck
    ) -> None:
        audit = self._audit
        if audit is None:
            return
        if subject.startswith(self._dead_letters) and headers:
            await audit.dead_letter(
                component=self._source, kind="source", headers=headers, stats=self._stats
            )
            return
        await audit.ingress(
            source=self._source,
            subject=subject,
            headers=headers,
            stream=ack.stream,
            sequence=ack.sequence,
            duplicate=ack.duplicate,
            stats=self._stats,
        )
