"""Python hot-path cost: telemetry emit/span next to prometheus_client and OTel.

Prints one JSON object (ns per operation, best of many rounds) for
bench/suite.exs, which puts it in the benchmark table:

    SNAKEPIT_TELEMETRY_IMPLEMENTATION=native python bench/python_hot_path.py [--rounds N]

The implementation is the one the package picks (``auto``, ``native`` or
``python`` from ``SNAKEPIT_TELEMETRY_IMPLEMENTATION``); the suite runs this
script once per implementation, each run measuring prometheus_client and the
OpenTelemetry SDK again as its same-process baseline. The result says which
implementation ran (``implementation``), so a ``native`` run without the
extension built is never reported as native.

Each round times every operation in turn (interleaved, so a noisy spell hits
all of them), with ``timeit`` running the bare statement (no wrapper frame):
``emit("python.call.stop", {"duration": 1})``, ``with span("python.call"):
pass``, ``counter.inc()`` and an OTel SDK span with a discarding exporter. Our
events go into a stream queue nothing reads, large enough for one round; after
each timed batch the queue is emptied through the public
``stream.drain_queued()`` (outside the timing; the same call on both
implementations), so every timed emit takes the queueing path, not the drop
path. The number of events taken back is checked against the number emitted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import timeit

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from prometheus_client import CollectorRegistry, Counter

from snakepit_telemetry import telemetry

ROUNDS = 200
PER_ROUND = 2000
# The OTel SDK span costs ~30x an emit: fewer per round keeps the run short.
OTEL_PER_ROUND = 200


class _Discard(SpanExporter):
    """An exporter that drops spans: measures the SDK, not an exporter."""

    def export(self, spans: object) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def implementation(stream: object) -> str:
    """The implementation of the stream ``emit`` writes to."""
    name = getattr(stream, "implementation", None)
    if isinstance(name, str):
        return name
    which = getattr(telemetry, "implementation", None)
    return str(which()) if callable(which) else "python"


def new_stream(queue_size: int) -> object:
    """A stream of the implementation in use (``telemetry.new_stream`` when there)."""
    factory = getattr(telemetry, "new_stream", None) or telemetry.TelemetryStream
    return factory(queue_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python_hot_path.py")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--per-round", type=int, default=PER_ROUND)
    opts = parser.parse_args(argv)
    per_round = max(1, opts.per_round)
    otel_per_round = max(1, per_round * OTEL_PER_ROUND // PER_ROUND)

    stream = new_stream(per_round * 4)
    telemetry.set_stream(stream)  # type: ignore[arg-type]

    counter = Counter("bench_calls", "calls", registry=CollectorRegistry())
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_Discard()))
    tracer = provider.get_tracer("bench")

    names = {
        "emit": telemetry.emit,
        "span": telemetry.span,
        "inc": counter.inc,
        "start_span": tracer.start_as_current_span,
        "measurements": {"duration": 1},
    }
    # (key, statement, calls per round, events queued per call)
    ops = [
        ("call_overhead_ns", "pass", per_round, 0),
        ("emit_ns", 'emit("python.call.stop", measurements)', per_round, 1),
        ("span_ns", 'with span("python.call"):\n    pass', per_round, 2),
        ("counter_inc_ns", "inc()", per_round, 0),
        ("otel_span_ns", 'with start_span("python.call"):\n    pass', otel_per_round, 0),
    ]
    timers = {key: timeit.Timer(stmt, globals=names) for key, stmt, _, _ in ops}
    samples: dict[str, list[float]] = {key: [] for key, _, _, _ in ops}
    lost = 0

    stream.drain_queued()  # type: ignore[attr-defined]
    for _ in range(max(1, opts.rounds)):
        for key, _stmt, number, events in ops:
            elapsed = timers[key].timeit(number=number)
            samples[key].append(elapsed / number * 1e9)
            if events:
                lost += number * events - len(stream.drain_queued())  # type: ignore[attr-defined]
    provider.shutdown()

    results: dict[str, object] = {key: min(values) for key, values in samples.items()}
    for key, values in samples.items():
        results[key.replace("_ns", "_median_ns")] = statistics.median(values)
    results.update(
        {
            "implementation": implementation(stream),
            "emit_type": type(telemetry.emit).__name__,
            "rounds": max(1, opts.rounds),
            "per_round": per_round,
            "events_lost": lost,
            "dropped_queue_full": stream.stats().get("dropped_queue_full", 0),  # type: ignore[attr-defined]
        }
    )
    json.dump(results, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
