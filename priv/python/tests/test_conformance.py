"""The stream under test converts odd values exactly as the pure batch encoder does.

Every raw event of ``test_wire``'s hand-picked cases and of its generator goes
through ``emit_event`` of a stream of the implementation under test, one at a
time, and what the stream queued (``drain_queued``) and counted
(``measurements_dropped``, ``internal_errors``) is compared with
``wire.BatchEncoder``'s result for the same event, which ``test_wire`` checks
against the reference conversion (``convert`` + the protobuf runtime). On the
native run this is the conversion in Rust; on the python run the pure stream's.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal import convert, wire

from .test_wire import EDGE_CASES, random_event, value_key


def view(event: pb.TelemetryEvent) -> tuple[Any, ...]:
    """What the receiver sees of one event, but its timestamp (emit stamps its own)."""
    return (
        tuple(event.event_parts),
        {k: value_key(v) for k, v in event.measurements.items()},
        dict(event.metadata),
        event.correlation_id,
        event.span_id,
        [(f.file, f.line, f.function) for f in event.stacktrace],
    )


def expected(raw: wire.RawEvent) -> tuple[list[tuple[Any, ...]], int, int]:
    """The batch encoder's events (0 or 1), measurements dropped and errors."""
    payload, consumed, _, dropped, errors, _ = wire.BatchEncoder().encode([raw], 1 << 24)
    assert consumed == 1
    batch = pb.TelemetryEventBatch.FromString(payload)
    return [view(e) for e in batch.events], dropped, errors


def check(stream: telemetry.AnyTelemetryStream, raws: list[wire.RawEvent]) -> None:
    for raw in raws:
        parts, measurements, metadata, correlation_id, _, span_id, stack = raw
        before = stream.stats()
        stream.emit_event(parts, measurements, metadata, correlation_id, None, span_id, stack)
        got = [view(convert.to_proto(e)) for e in stream.drain_queued()]
        after = stream.stats()
        want, dropped, errors = expected(raw)
        counted = (
            after["measurements_dropped"] - before["measurements_dropped"],
            after["internal_errors"] - before["internal_errors"],
        )
        assert (got, counted) == (want, (dropped, errors)), raw
        assert after["emitted"] == before["emitted"] + 1


@pytest.fixture
def s() -> telemetry.AnyTelemetryStream:
    return telemetry.new_stream(queue_size=64)


@pytest.mark.parametrize("raws", [c[1] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_edge_cases(s: telemetry.AnyTelemetryStream, raws: list[wire.RawEvent]) -> None:
    check(s, raws)


@pytest.mark.parametrize("seed", range(3))
def test_generated_events(s: telemetry.AnyTelemetryStream, seed: int) -> None:
    rng = random.Random(seed)
    check(s, [random_event(rng, 1_700_000_000_000_000_000) for _ in range(300)])


# The pure stream queues raw values; its encoders drop invalid UTF-8 (test_wire).
@pytest.mark.native_only
def test_lone_surrogates_never_reach_the_queue(s: telemetry.AnyTelemetryStream) -> None:
    bad = "bad\ud800"
    check(
        s,
        [
            (("python", "call", "stop"), {"s": bad}, None, None, 0, 0, ()),
            (("python", "call", "stop"), {bad: 1}, None, None, 0, 0, ()),
            (("python", "call", "stop"), {}, None, bad, 0, 0, ()),
            (("a", bad), {}, None, None, 0, 0, ()),
            (("python", "call", "stop"), {"x": 1}, {"k": bad, "ok": "v"}, None, 0, 0, ()),
            (("python", "call", "stop"), {"x": 1}, {bad: "v", "ok": "v"}, None, 0, 0, ()),
        ],
    )
