"""The stages a route may list between `from` and `to`, as they are written in busway.toml.

A stage is a table with exactly one key naming its kind, so a route reads top to bottom like
the pipeline it is:

    [[routes]]
    name = "orders"
    from = "orders.in.>"
    to = ["orders.accepted"]
    stages = [
      { filter = "total > `0`" },
      { set = { "meta.source" = "'web'" } },
      { switch = { cases = [{ when = "country == 'NL'", to = ["orders.nl"] }] } },
    ]

These are plain msgspec structs (no behaviour): `busway.routers.pipeline` compiles them. They
live here rather than with the engine's config so the routers stay testable on their own.
"""

from __future__ import annotations

import msgspec

from busway.routers.durations import Duration

__all__ = [
    "AggregateStage",
    "DedupeStage",
    "EnrichStage",
    "PythonStage",
    "SplitStage",
    "StageConfig",
    "SwitchCase",
    "SwitchStage",
    "ThrottleStage",
    "ValidateStage",
]


class _Table(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class SwitchCase(_Table, frozen=True, kw_only=True):
    """One branch of a content-based router: where a message matching `when` goes."""

    when: str
    to: list[str]


class SwitchStage(_Table, frozen=True, kw_only=True):
    """Content-based router: the first case that matches picks the destinations.

    With `all = true` every matching case contributes its destinations (a recipient list).
    `default` receives what no case matched; without it such messages are filtered.
    """

    cases: list[SwitchCase]
    default: list[str] = []
    all: bool = False


class SplitStage(_Table, frozen=True, kw_only=True):
    """One message per element of the array `on` evaluates to."""

    on: str
    correlation_id: str | None = None
    """Expression for the `Busway-Correlation-Id` header; default `<stream>:<seq>` of the input."""


class AggregateStage(_Table, frozen=True, kw_only=True):
    """Collect messages with the same `by` key into one, on `count`, `complete_when` or `timeout`.

    The aggregate's body is `into` evaluated over `{key, count, messages}` (default: that
    object itself). Inputs stay un-acked until the aggregate is stored; see the README.
    """

    by: str
    count: int | None = None
    timeout: Duration | None = None
    complete_when: str | None = None
    into: str | None = None

    def __post_init__(self) -> None:
        if self.count is None and self.timeout is None and self.complete_when is None:
            raise ValueError("aggregate needs `count`, `timeout` or `complete_when` to complete")
        if self.count is not None and self.count < 1:
            raise ValueError("aggregate `count` must be at least 1")


class EnrichStage(_Table, frozen=True, kw_only=True):
    """Ask another route (or any NATS service) and merge its answer into the body.

    `request` is a subject; the request body is `body` evaluated on the message (default the
    whole body). The JSON answer is stored at the dotted path `into` (default: merged into the
    top-level object).
    """

    request: str
    body: str | None = None
    into: str | None = None
    timeout: Duration = Duration(5.0)


class DedupeStage(_Table, frozen=True, kw_only=True):
    """Drop a message whose `key` was already seen within `window` (kept in JetStream KV)."""

    key: str
    window: Duration = Duration(600.0)


class PythonStage(_Table, frozen=True, kw_only=True):
    """Your function with its limits: `{ python = { function = "pkg.rules:f", timeout = "5s" } }`.

    A call that overruns `timeout` is retried like any transient error (naked with back-off,
    dead-lettered after `max_attempts`); its result, should it still come, is discarded.
    """

    function: str
    """`module:function`, sync or `async`: `f(body)` or `f(body, context)`."""
    timeout: Duration | None = None
    """Longest one call may take; default the smaller of 10 s and a third of the route's
    `ack_wait`. The message is kept alive meanwhile, so a longer timeout is allowed."""
    threads: int = 8
    """A synchronous function runs in worker threads, at most this many at once. A call past
    its `timeout` keeps its thread until it returns (Python cannot stop a thread), so a
    function that hangs for good ends up holding all of them: the route then waits, and
    reports itself stalled, rather than start threads without end."""

    def __post_init__(self) -> None:
        if self.timeout is not None and self.timeout <= 0:
            raise ValueError("python `timeout` must be a positive duration")
        if self.threads < 1:
            raise ValueError("python `threads` must be at least 1")


class ThrottleStage(_Table, frozen=True, kw_only=True):
    """At most `rate` messages per `per` (per `key` value if given); excess waits, never drops."""

    rate: int
    per: Duration = Duration(1.0)
    key: str | None = None

    def __post_init__(self) -> None:
        if self.rate < 1:
            raise ValueError("throttle `rate` must be at least 1")
        if self.per <= 0:
            raise ValueError("throttle `per` must be a positive duration")


class ValidateStage(_Table, frozen=True, kw_only=True):
    """Check the body against a JSON Schema file or a msgspec type (`module:Type`)."""

    schema: str | None = None
    type: str | None = None

    def __post_init__(self) -> None:
        if (self.schema is None) == (self.type is None):
            raise ValueError("validate takes exactly one of `schema` (a file) or `type`")


class StageConfig(_Table, frozen=True, kw_only=True):
    """One stage: exactly one of these keys is set."""

    filter: str | None = None
    transform: str | None = None
    set: dict[str, str] | None = None
    remove: list[str] | None = None
    rename: dict[str, str] | None = None
    python: str | PythonStage | None = None
    """Your function: `"module:function"`, or a table with `function`, `timeout`, `threads`."""
    split: str | SplitStage | None = None
    switch: SwitchStage | None = None
    aggregate: AggregateStage | None = None
    enrich: EnrichStage | None = None
    wiretap: str | None = None
    dedupe: DedupeStage | None = None
    throttle: ThrottleStage | None = None
    validate: ValidateStage | None = None
    set_headers: dict[str, str] | None = None
    reply: str | None = None
    """Answer a request: publish `reply` (an expression; `@` for the body) to its reply inbox."""

    def __post_init__(self) -> None:
        kinds = self.kinds()
        if len(kinds) != 1:
            names = ", ".join(kinds) if kinds else "none"
            raise ValueError(
                f"a stage has exactly one kind (filter, transform, set, ...); found {names}"
            )

    def kinds(self) -> list[str]:
        """The keys that are set (exactly one in a valid stage)."""
        return [name for name in self.__struct_fields__ if getattr(self, name) is not None]

    @property
    def kind(self) -> str:
        """This stage's kind: `filter`, `transform`, `switch`..."""
        return self.kinds()[0]
