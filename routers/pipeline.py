"""What a route's stages do to one message: items in, items out, side outputs on the way.

A message enters as one `Item` (its decoded body, the headers it will gain, its destinations);
each stage maps the list of items to a new list: a filter drops some, `split` makes several,
`switch` sets destinations. Stages that answer or copy (`reply`, `wiretap`) append `Output`s to
a side list instead. Stages that wait on the outside world (enrich, dedupe, throttle, async
Python) are `async` and reach it through `RouteServices`, which the engine implements with
NATS; everything here stays pure and testable without a broker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, Protocol

from busway.routers.context import MessageContext

__all__ = [
    "OUT",
    "REPLY",
    "TAP",
    "AsyncStep",
    "Item",
    "Output",
    "Reject",
    "RouteServices",
    "RoutingError",
    "Step",
    "SyncStep",
    "expression_error",
]

#: Output kinds. OUT: a route output, its input is acked only once it is stored. TAP: a
#: wiretap copy, published like an output but its failure never holds the input back. REPLY:
#: an answer to a request, published on core NATS to the requester's inbox.
OUT, TAP, REPLY = 0, 1, 2

#: The header a requester sets to the inbox it waits on; the `reply` stage answers there.
REPLY_TO_HEADER = "Busway-Reply-To"


class Item:
    """A message on its way through the stages: body, headers to add, destinations.

    `targets` None means "the route's `to`"; a `switch` sets it. `headers` None means "no
    headers of its own" (the input's headers pass through in any case).
    """

    __slots__ = ("document", "headers", "targets")

    def __init__(
        self,
        document: Any,
        headers: dict[str, str] | None = None,
        targets: tuple[str, ...] | None = None,
    ) -> None:
        self.document = document
        self.headers = headers
        self.targets = targets

    def derive(self, document: Any, extra_headers: dict[str, str]) -> Item:
        """A new item (from `split`) with this one's headers and destinations plus `extra`."""
        headers = dict(self.headers) if self.headers else {}
        headers.update(extra_headers)
        return Item(document, headers, self.targets)


class Output(NamedTuple):
    """One thing to publish: `kind` (OUT, TAP, REPLY), where, what, and the headers it adds."""

    kind: int
    subject: str
    body: bytes
    headers: dict[str, str] | None


class RoutingError(Exception):
    """A message cannot go through the route.

    `kind` names the cause (`decode`, `expression`, `validation`, `python`, `enrich`...);
    `expression` the failing expression's source; `stage` where in the route it failed, e.g.
    `stages[2].switch`. `transient` errors are retried with back-off (then dead-lettered after
    `max_attempts`); the others are dead-lettered at once. `headers` are added to the dead
    letter (e.g. the validation path).
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        expression: str | None = None,
        stage: str | None = None,
        transient: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.expression = expression
        self.stage = stage
        self.transient = transient
        self.headers = headers
        super().__init__(message)

    def dead_letter_headers(self) -> dict[str, str]:
        """Busway-* headers that tell an operator where and why this message failed."""
        headers = dict(self.headers) if self.headers else {}
        if self.expression:
            headers["Busway-Expression"] = self.expression
        if self.stage:
            headers["Busway-Stage"] = self.stage
        return headers


def expression_error(
    error: Exception, source: str, label: str, stage: str | None = None
) -> RoutingError:
    """The RoutingError for an expression that failed on a message: `label: error`, naming the
    expression's `source` and the `stage` (default: `label`) in the dead letter."""
    return RoutingError("expression", f"{label}: {error}", expression=source, stage=stage or label)


class Reject(Exception):
    """Raise from a `python` stage to dead-letter a message at once (no retries).

    Any other exception from a user function is treated as transient: retried with back-off,
    then dead-lettered after `max_attempts`.
    """


class RouteServices(Protocol):
    """What async stages need from the engine; busway implements it with NATS."""

    async def request(
        self, subject: str, body: bytes, headers: dict[str, str], timeout: float
    ) -> bytes:
        """Send a request and return the answer's body; TimeoutError if none comes in time."""
        ...

    async def claim(self, scope: str, key: str, owner: str, window: float) -> bool:
        """Record `key` as seen by `owner` for `window` seconds.

        True if it was unseen, or seen by the same `owner` (a redelivery of the same input must
        be published again, since its first attempt may not have been); False for a repeat.
        """
        ...


SyncStep = Callable[[list[Item], MessageContext | None, list[Output]], list[Item]]
AsyncStep = Callable[
    [list[Item], MessageContext | None, list[Output], RouteServices], Awaitable[list[Item]]
]
Step = tuple[SyncStep | AsyncStep, bool]
"""A compiled stage and whether it is async."""
