"""The hop count that cuts a loop between routes at run time: the `Busway-Hops` header.

Only routes that can take part in a cycle count (`busway._config.cycles` finds them): each of their
outputs carries `Busway-Hops` = the input's count + 1, and an input that already made
`hop_limit` hops is dead-lettered (reason `hop_limit`) instead of being routed again. Other
routes neither read nor write the header (it passes through like any other), so the common
route keeps its one-header publish path.
"""

from __future__ import annotations

from collections.abc import Mapping

from busway.routers.pipeline import RoutingError

__all__ = ["HOPS_HEADER", "HopCounter"]

HOPS_HEADER = "Busway-Hops"


class HopCounter:
    """Reads, checks and advances the hop count of messages on one route."""

    __slots__ = ("limit",)

    def __init__(self, limit: int) -> None:
        self.limit = limit

    @staticmethod
    def hops(headers: Mapping[str, str] | None) -> int:
        """The hop count a message carries: 0 without the header (or with a garbled one)."""
        value = headers.get(HOPS_HEADER) if headers else None
        if value is None or not value.isascii() or not value.isdigit() or len(value) > 9:
            return 0
        return int(value)

    def refusal(self, headers: Mapping[str, str] | None) -> RoutingError | None:
        """The error to dead-letter an input with when it used up its hops; else None."""
        hops = self.hops(headers)
        if hops < self.limit:
            return None
        return RoutingError(
            "hop_limit",
            f"the message already went through {hops} route hops (hop_limit {self.limit}): "
            "routes are passing it round a cycle; see `busway check` for the cycle",
        )

    def next_hop(self, headers: Mapping[str, str] | None) -> dict[str, str]:
        """The header the outputs of an input with `headers` carry."""
        return {HOPS_HEADER: str(self.hops(headers) + 1)}
