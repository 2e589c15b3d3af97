"""Outbox mode: claim rows, publish them, and delete (or mark) them in the claim transaction.

    BEGIN
    SELECT id, subject, headers, payload FROM outbox ORDER BY id LIMIT n FOR UPDATE SKIP LOCKED
    -- publish every row (pipelined), await every PubAck
    DELETE FROM outbox WHERE id IN (...)        -- or UPDATE ... SET published_at
    COMMIT

`SKIP LOCKED` (PostgreSQL; MariaDB >= 10.6; MySQL >= 8.0) lets several daemons claim side by
side: a row locked by one is skipped by the others, so none is published twice. SQLite has one
writer at a time: the claim opens with `BEGIN IMMEDIATE`, so a second daemon waits for the
first one's commit and then sees the rows gone. A crash after the publish and before the
commit leaves the rows in place; they are published again with the same `Nats-Msg-Id`
(`<source>:<table>:<id>`, or the row's own `Nats-Msg-Id` header) and the stream drops the
copies. The source name is part of the id because two outboxes in two databases may have
the same table name and the same ids: with `<table>:<id>` alone, the stream took the second
one's rows for copies of the first one's and dropped them, after which they were deleted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from busway import SourceContext
from busway.adapters.sql._config import SqlSourceConfig
from busway.adapters.sql._confirm import Confirmations
from busway.adapters.sql._database import Database
from busway.adapters.sql._subject import SubjectTemplate
from busway.adapters.sql._types import render_value

__all__ = ["OutboxClaimer"]

_COLUMNS = ["id", "subject", "headers", "payload"]


class OutboxClaimer:
    """Claims and publishes outbox rows; `poll` returns how many rows it handled."""

    def __init__(self, config: SqlSourceConfig, database: Database) -> None:
        self.config = config
        self.database = database
        self.table = config.outbox_table
        marked = config.on_publish == "mark"
        dialect = database.dialect
        self._claim = dialect.claim(self.table, config.batch_size, marked=marked)
        self._marked = marked
        self._id_prefix = f"{config.name}:"
        self._subject = SubjectTemplate(config.subject)
        self._subject.bind(_COLUMNS)

    def lead(self, fence: int) -> None:
        """Not used: daemons claim outbox rows side by side, without a lease."""

    async def load(self, context: SourceContext) -> None:
        """Nothing to resume: the outbox table itself is the state."""

    async def poll(self, context: SourceContext) -> int:
        """Publish the next claimed rows and remove them from the outbox."""
        dialect = self.database.dialect
        async with (
            self.database.transaction(write=True) as connection,
            Confirmations(context.publisher) as confirmations,
        ):
            _, rows = await connection.fetch(self._claim)
            if not rows:
                return 0
            context.stats.received += len(rows)
            ids = []
            for row_id, subject_value, raw_headers, payload in rows:
                ids.append(row_id)
                origin = f"{self.table}:{render_value(row_id)}"
                data = _payload(payload)
                try:
                    headers = _headers(raw_headers)
                    values = {"id": row_id, "subject": subject_value, "headers": raw_headers}
                    subject = self._subject.render(values)
                except ValueError as exc:
                    context.logger.warning("outbox row %s dead-lettered: %s", origin, exc)
                    await context.dead_letter(
                        data, reason="bad_row", error=str(exc), origin=origin, message_id=origin
                    )
                    continue
                headers.setdefault("Nats-Msg-Id", self._id_prefix + origin)
                await confirmations.publish(subject, data, headers)
            await confirmations.wait()
            sql = dialect.settle(self.table, len(ids), marked=self._marked)
            await connection.execute(sql, ids)
        context.stats.published += len(confirmations)
        return len(rows)


def _payload(value: Any) -> bytes:
    if value is None:
        return b""
    if isinstance(value, bytes):
        return value
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    return orjson.dumps(value)


def _headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str | bytes):
        try:
            value = orjson.loads(str(value) if isinstance(value, str) else value)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"headers are not a JSON object: {exc}") from None
    if not isinstance(value, Mapping):
        raise ValueError(  # noqa: TRY004 - bad data in a row, dead-lettered like the rest
            f"headers must be a JSON object of strings, got {type(value).__name__}"
        )
    return {str(name): item if isinstance(item, str) else str(item) for name, item in value.items()}
