"""emit/span semantics against the default stream (no gRPC needed)."""

from __future__ import annotations

import math
import threading

import pytest

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal.convert import QueuedEvent


def drain(stream: telemetry.AnyTelemetryStream) -> list[QueuedEvent]:
    """Peek at queued events without a gRPC call (tests only)."""
    return stream.drain_queued()


def test_emit_dotted_and_parts(stream: telemetry.AnyTelemetryStream) -> None:
    telemetry.emit("python.call.stop", {"duration": 5}, {"command": "x"}, "cid-1")
    telemetry.emit(["tool", "done"], {"n": 1})
    first, second = drain(stream)
    assert first.parts == ("python", "call", "stop")
    assert first.measurements == {"duration": 5}
    assert first.metadata == {"command": "x"}
    assert first.correlation_id == "cid-1"
    assert first.timestamp_ns > 0
    assert second.parts == ("tool", "done")
    assert second.correlation_id == ""


def test_measurement_conversion_and_drops(stream: telemetry.AnyTelemetryStream) -> None:
    telemetry.emit(
        "a.b",
        {
            "flag": True,
            "i": 7,
            "big": 2**63,
            "min": -(2**63),
            "f": 1.5,
            "nan": math.nan,
            "inf": math.inf,
            "s": "text",
            "obj": object(),
            "lst": [1],
            "none": None,
            3: 4,
        },
    )
    (item,) = drain(stream)
    assert item.measurements["flag"] == 1 and type(item.measurements["flag"]) is int
    assert item.measurements["min"] == -(2**63)
    assert math.isnan(item.measurements["nan"]) and item.measurements["inf"] == math.inf
    assert item.measurements["s"] == "text"
    assert set(item.measurements) == {"flag", "i", "min", "f", "nan", "inf", "s"}
    assert stream.stats()["measurements_dropped"] == 5


def test_metadata_stringified_and_none_skipped(stream: telemetry.AnyTelemetryStream) -> None:
    telemetry.emit("a.b", {}, {1: 2, "n": None, "s": "v", "f": 1.5})
    (item,) = drain(stream)
    assert item.metadata == {"1": "2", "s": "v", "f": "1.5"}


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


@pytest.mark.parametrize(
    "args",
    [
        ("a.b", None),
        ("a.b", [1, 2]),
        ("a.b", {"x": 1}, "not a dict"),
        ("a.b", {"x": 1}, {"bad": Unprintable()}),
        ("a.b", {"x": 1}, {Unprintable(): "v"}),
        ("a.b", {"x": 1}, None, Unprintable()),
        (None, {}),
        ("", {}),
        ("a..b", {}),
        (["a", 1], {}),
        ([], {}),
        (Unprintable(), {}),
    ],
)
def test_emit_never_raises(stream: telemetry.AnyTelemetryStream, args: tuple) -> None:
    telemetry.emit(*args)
    s = stream.stats()
    assert s["emitted"] == 1
    assert s["enqueued"] + s["dropped_invalid"] + s["internal_errors"] >= 1


def test_invalid_names_counted(stream: telemetry.AnyTelemetryStream) -> None:
    for bad in ("", "a..b", ".a", ["a", ""], ("a", None), 42, []):
        telemetry.emit(bad, {"x": 1})
    s = stream.stats()
    assert s["dropped_invalid"] == 7 and s["enqueued"] == 0


def test_non_dict_measurements(stream: telemetry.AnyTelemetryStream) -> None:
    telemetry.emit("a.b", None)
    telemetry.emit("a.b", [("x", 1)])
    assert [i.measurements for i in drain(stream)] == [{}, {}]
    assert stream.stats()["measurements_dropped"] == 1


def test_span_stop(stream: telemetry.AnyTelemetryStream) -> None:
    with telemetry.span("tool.execution", {"tool": "x"}, correlation_id="c") as sp:
        assert isinstance(sp, telemetry.span)
    start, stop = drain(stream)
    assert start.parts == ("tool", "execution", "start")
    assert start.measurements["system_time"] > 1_600_000_000 * 10**9
    assert start.metadata == {"tool": "x"}
    assert stop.parts == ("tool", "execution", "stop")
    assert stop.measurements["duration"] >= 0
    assert stop.metadata == {"tool": "x"}
    assert start.correlation_id == stop.correlation_id == "c"


def test_span_exception_reraised(stream: telemetry.AnyTelemetryStream) -> None:
    err = KeyError("k" * 5000)
    with pytest.raises(KeyError) as info, telemetry.span("tool.execution", {"tool": "x"}):
        raise err
    assert info.value is err
    _, exc = drain(stream)
    assert exc.parts == ("tool", "execution", "exception")
    assert exc.measurements["duration"] >= 0
    assert exc.metadata["tool"] == "x"
    assert exc.metadata["error_type"] == "KeyError"
    assert len(exc.metadata["error_message"]) == 1024


def test_span_unprintable_exception(stream: telemetry.AnyTelemetryStream) -> None:
    class Weird(Exception):
        def __str__(self) -> str:
            raise RuntimeError("boom")

    with pytest.raises(Weird), telemetry.span("s"):
        raise Weird()
    _, exc = drain(stream)
    assert exc.metadata["error_type"] == "Weird"
    assert exc.metadata["error_message"] == "<unprintable Weird>"


def test_span_duration_measured(stream: telemetry.AnyTelemetryStream) -> None:
    import time

    with telemetry.span("s"):
        time.sleep(0.02)
    _, stop = drain(stream)
    assert stop.measurements["duration"] >= 20_000_000


def test_queue_full_counted_exactly() -> None:
    s = telemetry.new_stream(queue_size=10)
    for _ in range(25):
        s.emit_event("a.b", {"x": 1})
    st = s.stats()
    assert (st["enqueued"], st["dropped_queue_full"], st["queue_len"]) == (10, 15, 10)
    assert st["emitted"] == 25


def test_emit_from_threads(stream: telemetry.AnyTelemetryStream) -> None:
    big = telemetry.new_stream(queue_size=3000)
    telemetry.set_stream(big)
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for _ in range(500):
            telemetry.emit("t.e", {"x": 1})

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    st = big.stats()
    assert st["emitted"] == 4000
    assert st["enqueued"] == 3000 and st["dropped_queue_full"] == 1000
    assert st["enqueued"] + st["dropped_queue_full"] == st["emitted"]


def test_get_set_stream() -> None:
    s = telemetry.new_stream(queue_size=5)
    telemetry.set_stream(s)
    assert telemetry.get_stream() is s
    assert telemetry.stats()["queue_size"] == 5
    with pytest.raises(TypeError):
        telemetry.set_stream("nope")  # type: ignore[arg-type]


def test_queue_size_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_QUEUE_SIZE", "7")
    assert telemetry.new_stream().queue_size == 7
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_QUEUE_SIZE", "bogus")
    assert telemetry.new_stream().queue_size == 1024


def test_stats_keys(stream: telemetry.AnyTelemetryStream) -> None:
    expected = {
        "emitted",
        "enqueued",
        "sent",
        "dropped_queue_full",
        "dropped_invalid",
        "dropped_disabled",
        "dropped_sampled",
        "dropped_filtered",
        "measurements_dropped",
        "internal_errors",
        "queue_len",
        "queue_size",
        "streams_opened",
        "active_stream",
    }
    st = stream.stats()
    assert expected <= set(st)
    assert st["active_stream"] is False
