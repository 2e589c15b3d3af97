"""Prometheus metrics, counted as plain integers on the hot path and exported on scrape.

prometheus-client's `Counter.inc()` takes a lock per call and its histograms more; at tens of
thousands of messages a second that is measurable. Components instead bump attributes of a
`ComponentStats` (one attribute add) and a custom collector turns them into metric families
when /metrics is read.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterator
from typing import Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from busway._observe.redact import redact

__all__ = ["ComponentStats", "LatencyHistogram", "MetricsCollector", "new_registry"]

Kind = Literal["source", "route", "sink"]

# Seconds; a hop on loopback takes well under a millisecond, a sink with fsync a few.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class LatencyHistogram:
    """A lock-free histogram: `observe` is one bisect and two adds."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        """Count one observation of `seconds`."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs in Prometheus' order, `+Inf` last."""
        buckets: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return buckets


class ComponentStats:
    """Counters of one source, route or sink.

    received: messages taken in; published: outputs stored in JetStream (sources, routes) or
    delivered out (sinks); filtered: acked with no output; dead_lettered: sent to the
    dead-letter subject; retried: naked for redelivery; errors: failures of any kind, by reason.
    """

    __slots__ = (
        "circuit",
        "dead_lettered",
        "errors",
        "events",
        "filtered",
        "in_flight",
        "kind",
        "last_error",
        "last_error_at",
        "latency",
        "max_in_flight",
        "name",
        "pending",
        "problems",
        "published",
        "rate_in",
        "rate_out",
        "ready",
        "received",
        "retried",
    )

    def __init__(self, name: str, kind: Kind) -> None:
        self.name = name
        self.kind: Kind = kind
        self.received = 0
        self.published = 0
        self.filtered = 0
        self.dead_lettered = 0
        self.retried = 0
        self.in_flight = 0
        self.errors: dict[str, int] = {}
        self.latency = LatencyHistogram()
        self.ready = False
        self.problems: dict[str, str] = {}
        """What keeps a started component from being ready (`stalled` ...), by kind: see
        `busway._observe.readiness`."""
        self.circuit = 0
        """Sinks: 0 closed, 1 open, 2 half-open (see `busway._egress.circuit`)."""
        self.events: dict[str, int] = {}
        """Adapter-specific counts (`files_done`, `bytes`...), exported as busway_events_total."""
        self.last_error = ""
        self.last_error_at = 0.0
        """Wall-clock time of `last_error` (0 if none yet)."""
        self.pending = 0
        """Routes and sinks: messages in JetStream not yet delivered to them (sampled)."""
        self.max_in_flight = 0
        """Routes and sinks: their `max_in_flight`, to see saturation against it."""
        self.rate_in = 0.0
        self.rate_out = 0.0
        """Messages per second received / published, over the last sampling interval."""

    def count_error(self, reason: str) -> None:
        """Count one failure of kind `reason` (e.g. `decode`, `publish`, `http_5xx`)."""
        self.errors[reason] = self.errors.get(reason, 0) + 1

    def count(self, event: str, amount: int = 1) -> None:
        """Count an adapter-specific event (files claimed, rows read, requests rate-limited)."""
        self.events[event] = self.events.get(event, 0) + amount

    def note_error(self, error: str) -> None:
        """Remember the latest failure for `busway status` (cheap: failures are rare), masked
        by the `[redaction]` rules: `/status` must not show a card number from a payload."""
        self.last_error = redact(error)
        self.last_error_at = time.time()


class MetricsCollector(Collector):
    """Exports every registered `ComponentStats` as `busway_*` metric families."""

    def __init__(self) -> None:
        self._stats: list[ComponentStats] = []

    @property
    def stats(self) -> list[ComponentStats]:
        """Every exported component's counters, in registration order."""
        return list(self._stats)

    def add(self, stats: ComponentStats) -> ComponentStats:
        """Export `stats` from now on; returns it for chaining."""
        self._stats.append(stats)
        return stats

    def remove(self, stats: ComponentStats) -> None:
        """Stop exporting `stats` (its component was removed by a reload)."""
        self._stats = [s for s in self._stats if s is not stats]

    def collect(self) -> Iterator[Metric]:
        """Build the metric families from the current counter values."""
        labels = ["component", "kind"]
        counters = {
            "received": "Messages taken in",
            "published": "Messages stored in JetStream (sources, routes) or delivered (sinks)",
            "filtered": "Messages acked without output (not matched)",
            "dead_lettered": "Messages sent to the dead-letter subject",
            "retried": "Messages naked for redelivery after a transient failure",
        }
        for attribute, help_text in counters.items():
            family = CounterMetricFamily(f"busway_messages_{attribute}", help_text, labels=labels)
            for stats in self._stats:
                family.add_metric([stats.name, stats.kind], getattr(stats, attribute))
            yield family
        errors = CounterMetricFamily(
            "busway_errors", "Failures by reason", labels=[*labels, "reason"]
        )
        in_flight = GaugeMetricFamily(
            "busway_in_flight", "Messages taken in and not yet acked", labels=labels
        )
        ready = GaugeMetricFamily(
            "busway_component_ready", "1 if the component is ready", labels=labels
        )
        events = CounterMetricFamily(
            "busway_events",
            "Adapter-specific events (files claimed, bytes read...)",
            labels=[*labels, "event"],
        )
        pending = GaugeMetricFamily(
            "busway_consumer_pending",
            "Routes and sinks: messages in JetStream not yet delivered to them (lag)",
            labels=labels,
        )
        limit = GaugeMetricFamily(
            "busway_max_in_flight",
            "Routes and sinks: most messages held un-acked at once",
            labels=labels,
        )
        circuit = GaugeMetricFamily(
            "busway_circuit_state",
            "Sinks: 0 closed, 1 open (not delivering), 2 half-open (probing)",
            labels=labels,
        )
        latency = HistogramMetricFamily(
            "busway_hop_latency_seconds",
            "From taking a message in to its ack (all outputs stored or delivered)",
            labels=labels,
        )
        for stats in self._stats:
            key = [stats.name, stats.kind]
            for reason, count in sorted(stats.errors.items()):
                errors.add_metric([*key, reason], count)
            for event, count in sorted(stats.events.items()):
                events.add_metric([*key, event], count)
            in_flight.add_metric(key, stats.in_flight)
            ready.add_metric(key, 1 if stats.ready and not stats.problems else 0)
            if stats.kind != "source":
                pending.add_metric(key, stats.pending)
                limit.add_metric(key, stats.max_in_flight)
            if stats.kind == "sink":
                circuit.add_metric(key, stats.circuit)
            latency.add_metric(key, stats.latency.cumulative(), stats.latency.total)
        yield from (errors, events, in_flight, ready, pending, limit, circuit, latency)


def new_registry(collector: MetricsCollector) -> CollectorRegistry:
    """A registry of its own per bus, so several buses in one process never collide."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    return registry
