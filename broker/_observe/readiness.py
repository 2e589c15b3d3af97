"""What `/readyz` reports beyond "started": stalled consumers and writes JetStream refuses.

A component is ready when it says so (`ComponentStats.ready`: started, a sink's peer
reachable, its circuit closed) and has no `problems`. Problems are set and cleared by whoever
sees them:

* `stalled`: a route or sink has every in-flight slot taken and settled nothing for longer
  than its `ack_wait` (`ConsumerComponent` watches this);
* `jetstream` (bus-wide, see `WriteRefusals`): JetStream refused a write because a limit is
  full (a stream's `max_bytes` / `max_msgs` with discard-new, the account's or server's
  storage). Routes, sinks' dead letters and sources report refusals and the successful writes
  that end them.

Reasons are short operational sentences (component, subject, JetStream's own description),
never exception reprs: `/readyz` is served without authentication.
"""

from __future__ import annotations

import time

from busway._egress.circuit import OPEN
from busway._observe.metrics import ComponentStats

__all__ = ["WriteRefusals", "component_reason"]


class WriteRefusals:
    """Subjects JetStream refused to store for lack of room, until a write there succeeds.

    A refusal counts for `memory` seconds after it was last seen: a subject nobody writes to
    any more (the source that hit the limit went quiet) does not keep busway unready forever,
    while one that is retried keeps refreshing it.
    """

    __slots__ = ("_clock", "_refused", "memory")

    def __init__(self, memory: float = 60.0, clock: object = time.monotonic) -> None:
        self.memory = memory
        self._clock = clock
        self._refused: dict[str, tuple[str, float]] = {}

    @property
    def active(self) -> bool:
        """True if any refusal is remembered (cheap: checked on the hot path)."""
        return bool(self._refused)

    def refused(self, subject: str, description: str) -> None:
        """JetStream refused a write to `subject` for lack of room (`description` says why)."""
        self._refused[subject] = (description, self._now())

    def stored(self, subject: str) -> None:
        """A write to `subject` succeeded: it has room again."""
        self._refused.pop(subject, None)

    def reason(self) -> str | None:
        """Why writes fail, for `/readyz`, or None when no recent refusal is known."""
        cutoff = self._now() - self.memory
        for subject in [s for s, (_, seen) in self._refused.items() if seen < cutoff]:
            del self._refused[subject]
        if not self._refused:
            return None
        subject, (description, _) = next(iter(self._refused.items()))
        more = len(self._refused) - 1
        others = f" (and {more} other subject(s))" if more else ""
        return (
            f"JetStream refuses writes to {subject!r}{others}: {description}; "
            "free space or raise the stream's or account's limit"
        )

    def _now(self) -> float:
        return float(self._clock())  # type: ignore[operator]


def component_reason(stats: ComponentStats) -> str | None:
    """Why the component is not ready, or None if it is."""
    if stats.problems:
        return "; ".join(stats.problems.values())
    if stats.ready:
        return None
    if stats.kind == "sink" and stats.circuit == OPEN:
        return "circuit open: its peer keeps failing; deliveries wait for it"
    if stats.kind == "sink" and stats.errors:
        return "its last delivery failed; retrying (busway status shows the error)"
    return "starting"
