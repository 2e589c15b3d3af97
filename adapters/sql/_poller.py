"""Incremental mode: read rows past the watermark, publish them, then store the watermark.

Each poll selects at most `batch_size` rows ordered by the watermark columns, publishes each
as a JSON object with `Nats-Msg-Id = <source>:<table>:<key>[:<watermark>]` (`<source>:<key>...`
for a query), awaits every PubAck, and only then stores the last row's watermark in the state
store. A crash anywhere before that store means the next poll reads the same rows again; the
stream drops the copies it already has (within its `duplicate_window`), so nothing is lost and
nothing is duplicated. With several daemons only the holder of the source's lease polls, and
the watermark is stored fenced by the lease's token and never moved back (see `_watermark`).
The source name in the id keeps apart two sources that read tables of the same name in two
databases into one stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from busway import RetryableError, SourceContext
from busway.adapters.sql._config import SqlSourceConfig
from busway.adapters.sql._confirm import Confirmations
from busway.adapters.sql._database import Database
from busway.adapters.sql._subject import SubjectTemplate
from busway.adapters.sql._types import encode_row, render_value
from busway.adapters.sql._watermark import load_watermark, store_watermark

__all__ = ["IncrementalPoller"]


class IncrementalPoller:
    """Polls one table or query; `poll` returns how many rows it handled."""

    def __init__(self, config: SqlSourceConfig, database: Database) -> None:
        self.config = config
        self.database = database
        dialect = database.dialect
        relation = dialect.relation(config.table, config.query)
        limit = config.batch_size
        self._first = dialect.select_after(relation, config.watermark, after=False, limit=limit)
        self._next = dialect.select_after(relation, config.watermark, after=True, limit=limit)
        self._prefix = config.table or config.name
        """What the row is called in logs and dead letters: `<table>:<key>`."""
        self._id_prefix = f"{config.name}:{config.table}:" if config.table else f"{config.name}:"
        self._subject = SubjectTemplate(config.subject)
        self._json_columns = frozenset(config.json_columns)
        self._watermark: list[Any] | None = None
        self._fence = 0
        self._loaded = False

    def lead(self, fence: int) -> None:
        """This daemon now holds the lease with token `fence`: reload before the next poll."""
        self._fence = fence
        self._loaded = False

    async def load(self, context: SourceContext) -> None:
        """Read the stored watermark: reading resumes after it."""
        self._watermark = await load_watermark(context)
        self._loaded = True
        if self._watermark is not None:
            context.logger.info("resuming after watermark %s", self._watermark)

    async def poll(self, context: SourceContext) -> int:
        """Publish the next rows and advance the watermark past them."""
        if not self._loaded:
            await self.load(context)
        if self._watermark is None:
            sql, params = self._first, []
        else:
            sql, params = self._next, self.database.dialect.after_params(self._watermark)
        async with self.database.transaction() as connection:
            columns, rows = await connection.fetch(sql, params)
        if not rows:
            return 0
        context.stats.received += len(rows)
        positions = _positions(columns, self.config.watermark, "watermark")
        keys = _positions(columns, self.config.row_key, "key")
        try:
            self._subject.bind(columns)
        except ValueError as exc:
            raise RetryableError(f"{exc}: fix `subject` or the query") from None
        async with Confirmations(context.publisher) as confirmations:
            for row in rows:
                await self._publish(context, confirmations, columns, row, positions, keys)
            await confirmations.wait()
        context.stats.published += len(confirmations)
        watermark = [rows[-1][i] for i in positions]
        self._watermark = await store_watermark(
            context, watermark, fence=self._fence, logger=context.logger
        )
        return len(rows)

    async def _publish(
        self,
        context: SourceContext,
        confirmations: Confirmations,
        columns: list[str],
        row: Sequence[Any],
        positions: list[int],
        keys: list[int],
    ) -> None:
        key = ",".join(render_value(row[i]) for i in keys)
        message_id = self._id_prefix + key
        if keys != positions:
            message_id += ":" + ",".join(render_value(row[i]) for i in positions)
        try:
            data = encode_row(columns, row, self._json_columns)
            subject = self._subject.render(
                {field: row[columns.index(field)] for field in self._subject.fields}
            )
        except (ValueError, TypeError, orjson.JSONEncodeError) as exc:
            context.logger.warning("row %s:%s dead-lettered: %s", self._prefix, key, exc)
            await context.dead_letter(
                _describe(columns, row),
                reason="bad_row",
                error=str(exc),
                origin=f"{self._prefix}:{key}",
                message_id=message_id,
            )
            return
        headers = {"Nats-Msg-Id": message_id, "Content-Type": "application/json"}
        await confirmations.publish(subject, data, headers)


def _positions(columns: Sequence[str], wanted: Sequence[str], what: str) -> list[int]:
    missing = [column for column in wanted if column not in columns]
    if missing:
        raise RetryableError(
            f"{what} column(s) {missing} are not in the result (columns: {list(columns)}); "
            "fix the source's config or select them in the query"
        )
    return [list(columns).index(column) for column in wanted]


def _describe(columns: Sequence[str], row: Sequence[Any]) -> bytes:
    """A best-effort JSON rendering of a row that could not be encoded, for the dead letter."""
    return orjson.dumps({column: repr(value) for column, value in zip(columns, row, strict=True)})
