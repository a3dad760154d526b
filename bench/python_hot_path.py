"""Python hot-path cost: telemetry emit/span next to prometheus_client and OTel.

Prints one JSON object (ns per operation, best of many rounds) for
bench/suite.exs, which puts it in the benchmark table:

    python bench/python_hot_path.py

Each operation runs in the same process and the same timing loop. Our events
go into a queue nothing reads; the queue is emptied between rounds (outside
the timing), so every timed emit takes the queueing path, not the drop path.
"""

from __future__ import annotations

import json
import sys
import timeit
from collections.abc import Callable

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry.stream import TelemetryStream

ROUNDS = 200
PER_ROUND = 2000


class _Discard(SpanExporter):
    """An exporter that drops spans: measures the SDK, not an exporter."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def best_ns(op: Callable[[], object], reset: Callable[[], None]) -> float:
    """Lowest mean cost per call over ROUNDS rounds of PER_ROUND calls."""
    best = float("inf")
    for _ in range(ROUNDS):
        reset()
        elapsed = timeit.timeit(op, number=PER_ROUND)
        best = min(best, elapsed / PER_ROUND * 1e9)
    return best


def main() -> int:
    stream = TelemetryStream(queue_size=ROUNDS * PER_ROUND * 4)
    telemetry.set_stream(stream)
    reset = stream._queue.clear  # noqa: SLF001 - benchmark harness only

    def nothing() -> None:
        pass

    counter = Counter("bench_calls", "calls", registry=CollectorRegistry())
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Discard()))
    tracer = provider.get_tracer("bench")

    emit = telemetry.emit
    span = telemetry.span
    measurements = {"duration": 1}

    def do_emit() -> None:
        emit("python.call.stop", measurements)

    def do_span() -> None:
        with span("python.call"):
            pass

    def do_inc() -> None:
        counter.inc()

    def do_otel() -> None:
        with tracer.start_as_current_span("python.call"):
            pass

    results = {
        "call_overhead_ns": best_ns(lambda: None, nothing),
        "emit_ns": best_ns(do_emit, reset),
        "span_ns": best_ns(do_span, reset),
        "counter_inc_ns": best_ns(do_inc, nothing),
        "otel_span_ns": best_ns(do_otel, nothing),
    }
    provider.shutdown()
    json.dump(results, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
