"""The database sink: each batch in one transaction; a refused row is found by bisection.

    [[sinks]]
    type = "postgres"
    table = "orders"
    columns = { id = "id", total = "total", customer = "customer.name" }
    key = ["id"]            # upsert: redelivery updates the same row, never adds one

A batch's rows are written with one `executemany` (pipelined or multi-row by the driver) and
one commit; only then does the engine ack the batch. When the database refuses a row (a
constraint, a value that does not fit), the batch is split in halves and each half retried in
its own transaction, down to the refused rows: those are dead-lettered with the database's
message while every other row commits. A lost connection fails the rest of the batch as
retryable (nak with back-off) and readiness turns false until a write succeeds again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import orjson

from busway import (
    BatchError,
    ConfigError,
    DeliveryError,
    Message,
    PermanentError,
    RetryableError,
    Sink,
)
from busway.adapters.sql._config import SqlSinkConfig
from busway.adapters.sql._database import Database, RowError
from busway.routers.context import CONTEXT_FUNCTIONS, MessageContext
from busway.routers.expression import (
    Expression,
    ExpressionRuntimeError,
    ExpressionSyntaxError,
    compile_expression,
)

__all__ = ["SqlSink"]

logger = logging.getLogger("busway.adapters.sql")

Item = tuple[int, list[Any]]
"""A message's index in its batch, and its statement parameters."""


class SqlSink(Sink):
    """Writes messages as rows; `adapt` turns a JSON value into the driver's parameter."""

    def __init__(
        self, config: SqlSinkConfig, database: Database, *, adapt: Callable[[Any], Any]
    ) -> None:
        self.config = config
        self.database = database
        self._adapt = adapt
        if config.table is not None:
            self.sql = database.dialect.insert(config.table, list(config.columns), config.key)
            sources = [(f"$.columns.{column}", text) for column, text in config.columns.items()]
        else:
            assert config.statement is not None
            self.sql = config.statement
            sources = [(f"$.params[{i}]", text) for i, text in enumerate(config.params)]
        self._expressions: list[Expression] = []
        for path, text in sources:
            try:
                self._expressions.append(compile_expression(text, functions=CONTEXT_FUNCTIONS))
            except ExpressionSyntaxError as exc:
                raise ConfigError(str(exc), path=path) from None
        self._healthy = True

    async def open(self) -> None:
        """Create the pool; an unreachable database is not fatal: messages wait for it."""
        try:
            await self.database.open()
        except DeliveryError as exc:
            self._healthy = False
            logger.warning(
                "sink %s: database not reachable yet, will retry: %s", self.config.name, exc
            )

    async def close(self) -> None:
        """Close the pool."""
        await self.database.close()

    def ready(self) -> bool:
        """False after a failed connection or transaction, until a write succeeds."""
        return self._healthy

    async def write(self, batch: Sequence[Message]) -> None:
        """Write every message of `batch` as a row; per-message failures as a BatchError."""
        failures: dict[int, DeliveryError] = {}
        items: list[Item] = []
        adapt = self._adapt
        for index, message in enumerate(batch):
            try:
                document = orjson.loads(message.data)
            except orjson.JSONDecodeError as exc:
                failures[index] = PermanentError(f"message {message.id} is not JSON: {exc}")
                continue
            context = MessageContext(
                subject=message.subject,
                headers=message.headers,
                stream=message.stream,
                sequence=message.sequence,
                attempt=message.attempt,
            )
            try:
                params = [adapt(expression(document, context)) for expression in self._expressions]
            except ExpressionRuntimeError as exc:
                failures[index] = PermanentError(f"message {message.id}: {exc}")
                continue
            items.append((index, params))
        if items:
            failures.update(await self._write(items))
        if not failures:
            return
        if len(failures) == len(batch):
            errors = list(failures.values())
            if all(error is errors[0] for error in errors):
                raise errors[0]  # the whole batch failed alike (database down): say it once
        raise BatchError(failures)

    async def _write(self, items: list[Item]) -> dict[int, DeliveryError]:
        """Write `items` in one transaction; bisect on a refused row. Returns the failures."""
        try:
            async with self.database.transaction(write=True) as connection:
                await connection.executemany(self.sql, [params for _, params in items])
        except RowError as exc:
            if len(items) == 1:
                return {items[0][0]: PermanentError(f"{self.database.dialect.name}: {exc}")}
            middle = len(items) // 2
            failures = await self._write(items[:middle])
            failures.update(await self._write(items[middle:]))
            return failures
        except RetryableError as exc:
            self._healthy = False
            return dict.fromkeys((index for index, _ in items), exc)
        self._healthy = True
        return {}
