"""The `mysql` source and sink (MariaDB >= 10.6, MySQL >= 8.0), on asyncmy with its pool.

    [[sinks]]
    name = "orders-db"
    type = "mysql"
    from = "orders.paid"
    dsn = "mysql://busway:${MYSQL_PASSWORD}@db:3306/shop"
    table = "orders"
    columns = { id = "id", total = "total" }
    key = ["id"]                        # INSERT ... ON DUPLICATE KEY UPDATE

Why asyncmy rather than aiomysql (`benches/bench_sql.py drivers`): a 10k-row upsert batch is
about as fast with both when the statement is spelled `VALUES (` (aiomysql falls back to one
round trip per row for `VALUES(`), and asyncmy, compiled with Cython, reads rows six to seven
times faster. Sessions run in UTC (`time_zone = '+00:00'`), so TIMESTAMP columns come out as
UTC instants; DATETIME columns have no zone and are taken as UTC too.

MySQL's JSON is LONGTEXT to the client: list such columns in the source's `json_columns` to
embed them as JSON. DATETIME parameters must be `YYYY-MM-DD HH:MM:SS[.ffffff]` (MariaDB
refuses an ISO 8601 offset); reshape them in the expression or the statement.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import anyio
import orjson

try:
    import asyncmy
    import asyncmy.errors
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        f"the mysql adapter needs asyncmy ({exc}): pip install 'busway[mysql]'"
    ) from exc

from busway import Adapter, BuildContext, Duration, RetryableError
from busway.adapters.sql._config import SqlSinkConfig, SqlSourceConfig
from busway.adapters.sql._database import Connection, RowError, Rows
from busway.adapters.sql._dialect import MYSQL
from busway.adapters.sql._sink import SqlSink
from busway.adapters.sql._source import SqlSource

__all__ = [
    "MySqlDatabase",
    "MySqlSinkConfig",
    "MySqlSourceConfig",
    "adapter",
    "create_sink",
    "create_source",
]

# Errors MySQL reports about the values of a row (not the connection or the statement):
# null into NOT NULL, duplicate key, out of range, truncated, wrong value, too long, foreign
# key, CHECK constraint (MariaDB 4025, MySQL 3819), invalid JSON (MySQL 3140).
_ROW_ERRORS = frozenset(
    {1048, 1062, 1264, 1265, 1292, 1366, 1406, 1451, 1452, 1690, 3140, 3819, 4025}
)


class MySqlSourceConfig(SqlSourceConfig, tag="mysql", frozen=True, kw_only=True):
    """A MySQL/MariaDB source: `dsn = "mysql://user:password@host:3306/database"`."""

    dsn: str
    pool_size: int = 2
    connect_timeout: Duration = Duration(5.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _parse_dsn(self.dsn)


class MySqlSinkConfig(SqlSinkConfig, tag="mysql", frozen=True, kw_only=True):
    """A MySQL/MariaDB sink; a `statement` uses `%s` placeholders."""

    dsn: str
    pool_size: int = 2
    connect_timeout: Duration = Duration(5.0)

    def __post_init__(self) -> None:
        super().__post_init__()
        _parse_dsn(self.dsn)


def _parse_dsn(dsn: str) -> dict[str, Any]:
    parts = urlsplit(dsn)
    if parts.scheme not in ("mysql", "mariadb") or not parts.hostname:
        raise ValueError("dsn must look like mysql://user:password@host:3306/database")
    return {
        "host": parts.hostname,
        "port": parts.port or 3306,
        "user": unquote(parts.username or ""),
        "password": unquote(parts.password or ""),
        "database": unquote(parts.path.lstrip("/")) or None,
    }


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """asyncmy's exceptions (and lost sockets) as busway's (see `_database`)."""
    try:
        yield
    except asyncmy.errors.MySQLError as exc:
        code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else None
        text = f"MySQL error {code}: {exc.args[1] if len(exc.args) > 1 else exc}"
        if code in _ROW_ERRORS or isinstance(
            exc, asyncmy.errors.DataError | asyncmy.errors.IntegrityError
        ):
            raise RowError(text) from exc
        raise RetryableError(text) from exc
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise RetryableError(f"MySQL connection failed: {exc!r}") from exc


def adapt(value: Any) -> Any:
    """A JSON value as an asyncmy parameter (objects and arrays as JSON text)."""
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return value


class _MySqlConnection:
    def __init__(self, connection: Any) -> None:
        self._connection = connection

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> Rows:
        async with self._connection.cursor() as cursor:
            await cursor.execute(sql, tuple(params) or None)
            columns = [column[0] for column in cursor.description or ()]
            return columns, list(await cursor.fetchall())

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> None:
        async with self._connection.cursor() as cursor:
            await cursor.execute(sql, tuple(params) or None)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._connection.cursor() as cursor:
            await cursor.executemany(sql, [tuple(row) for row in rows])


class MySqlDatabase:
    """A bounded asyncmy pool; a connection that failed is closed, not returned to the pool."""

    dialect = MYSQL

    def __init__(self, dsn: str, *, pool_size: int, connect_timeout: float) -> None:
        self._options = _parse_dsn(dsn)
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self._pool: Any = None
        self._lock = anyio.Lock()

    async def open(self) -> None:
        """Create the pool with one connection; RetryableError if the server is unreachable."""
        async with self._lock:
            if self._pool is not None:
                return
            with _translated():
                self._pool = await asyncmy.create_pool(
                    minsize=1,
                    maxsize=self.pool_size,
                    pool_recycle=600,
                    autocommit=False,
                    charset="utf8mb4",
                    connect_timeout=max(1, round(self.connect_timeout)),
                    init_command="SET time_zone = '+00:00'",
                    **self._options,
                )

    async def close(self) -> None:
        """Close the pool and its connections."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()
            with anyio.move_on_after(5, shield=True):
                await pool.wait_closed()

    @contextlib.asynccontextmanager
    async def transaction(self, *, write: bool = False) -> AsyncIterator[Connection]:
        """A pooled connection inside BEGIN ... COMMIT (ROLLBACK on any exception)."""
        await self.open()
        with _translated():
            connection = await self._pool.acquire()
            try:
                await connection.begin()
                yield _MySqlConnection(connection)
                await connection.commit()
            except BaseException as exc:
                if isinstance(exc, asyncmy.errors.OperationalError | OSError | TimeoutError):
                    connection.close()  # the socket may be dead: never reuse it
                else:
                    with anyio.move_on_after(5, shield=True):
                        try:
                            await connection.rollback()
                        except Exception:  # rollback of a dying connection
                            connection.close()
                raise
            finally:
                self._pool.release(connection)


def create_source(config: MySqlSourceConfig, context: BuildContext) -> SqlSource:
    """The source of a `type = "mysql"` config (no I/O here)."""
    database = MySqlDatabase(
        config.dsn, pool_size=config.pool_size, connect_timeout=float(config.connect_timeout)
    )
    return SqlSource(config, database)


def create_sink(config: MySqlSinkConfig, context: BuildContext) -> SqlSink:
    """The sink of a `type = "mysql"` config (no I/O here)."""
    database = MySqlDatabase(
        config.dsn, pool_size=config.pool_size, connect_timeout=float(config.connect_timeout)
    )
    return SqlSink(config, database, adapt=adapt)


adapter: Adapter[MySqlSourceConfig, MySqlSinkConfig] = Adapter(
    type="mysql",
    source_config=MySqlSourceConfig,
    create_source=create_source,
    sink_config=MySqlSinkConfig,
    create_sink=create_sink,
)
