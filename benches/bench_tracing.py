"""The per-message CPU cost of `[tracing]` on a route hop, without NATS: what it adds to a hop.

`bench_hop.py --tracing off,1%` measures the whole hop, but on a shared, loaded machine its
round-to-round noise (±20 %) is larger than the effect. This bench isolates the code tracing
adds to one route hop: `Spans.route_hop` around a handler that does nothing, for inputs whose
`traceparent` is sampled with the given ratio (as an ingress stamps it), against calling the
handler directly (tracing off: the `is None` test the consumer makes). Spans go to an exporter
that drops them. Divide by the hop's own cost per message (1 / the hop bench's msg/s) for the
share.

    python benches/bench_tracing.py                  # 200k messages per mode
"""

from __future__ import annotations

import argparse
import random
import time

import anyio
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from busway._config.model import TracingConfig
from busway._delivery.delivery import Delivery
from busway._observe.spans import open_spans


class DroppingExporter(SpanExporter):
    """Drops spans: the bench measures busway, not a collector."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def traceparent(ratio: float) -> str:
    flags = "01" if random.random() < ratio else "00"
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-{flags}"


def deliveries(count: int, ratio: float) -> list[Delivery]:
    return [
        Delivery(
            None,  # type: ignore[arg-type]
            "in.orders",
            b"{}",
            {"traceparent": traceparent(ratio), "Nats-Msg-Id": f"m{i}"},
            f"$JS.ACK.IN.bench.1.{i + 1}.{i + 1}.0.0",
            "IN",
            str(i + 1),
            1,
        )
        for i in range(count)
    ]


async def measure(count: int, ratio: float | None) -> float:
    """Microseconds per message for `count` messages through the hop's tracing code."""
    messages = deliveries(count, ratio or 0.0)
    spans = open_spans(TracingConfig(enabled=True, sample_ratio=ratio or 0.0), DroppingExporter())

    async def handle(message: Delivery) -> None:
        return None

    route_spans = spans if ratio is not None else None
    started = time.perf_counter()
    for message in messages:
        if route_spans is not None:
            await route_spans.route_hop(handle, message, "bench")
        else:
            await handle(message)
    elapsed = time.perf_counter() - started
    spans.shutdown()
    return elapsed / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    modes: dict[str, float | None] = {"off": None, "1%": 0.01, "100%": 1.0}
    results: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.rounds):
        for name, ratio in modes.items():
            results[name].append(anyio.run(measure, args.count, ratio))
    for name, values in results.items():
        best = min(values)
        print(f"tracing {name:>4}: {best:.2f} µs/message (best of {args.rounds})")
    extra = min(results["1%"]) - min(results["off"])
    print(f"1% sampling adds {extra:.2f} µs per route hop")


if __name__ == "__main__":
    main()
