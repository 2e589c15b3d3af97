"""A circuit breaker per sink: stop hammering a peer that keeps failing, probe, recover.

After `failures` consecutive failed deliveries the circuit opens: the sink stops pulling and
delivering for `cool_down` (messages wait in JetStream or in memory, kept alive: back-pressure,
never loss). Then it half-opens: one message is delivered as a probe. Success closes the
circuit; failure opens it for another cool-down.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "STATE_NAMES", "CircuitBreaker"]

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = {CLOSED: "closed", OPEN: "open", HALF_OPEN: "half_open"}


class CircuitBreaker:
    """The state machine only: the sink worker asks it what to do and tells it what happened."""

    __slots__ = ("_clock", "_consecutive", "cool_down", "failures", "opened_at", "state")

    def __init__(
        self, failures: int, cool_down: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.failures = failures
        self.cool_down = cool_down
        self.state = CLOSED
        self.opened_at = 0.0
        self._consecutive = 0
        self._clock = clock

    @property
    def enabled(self) -> bool:
        """False when `failures` is 0: the sink never opens its circuit."""
        return self.failures > 0

    def wait_time(self) -> float:
        """Seconds until a delivery may be tried (0 when closed or half-open)."""
        if self.state != OPEN:
            return 0.0
        remaining = self.opened_at + self.cool_down - self._clock()
        if remaining <= 0:
            self.state = HALF_OPEN
            return 0.0
        return remaining

    def succeeded(self) -> None:
        """A delivery went through: close the circuit."""
        self._consecutive = 0
        self.state = CLOSED

    def failed(self) -> bool:
        """A delivery failed transiently; True if that opened the circuit."""
        self._consecutive += 1
        if not self.enabled:
            return False
        if self.state == HALF_OPEN or self._consecutive >= self.failures:
            opened = self.state != OPEN
            self.state = OPEN
            self.opened_at = self._clock()
            return opened
        return False
