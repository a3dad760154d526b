"""Backend selection, the Backend contract, composite/none and the stderr backend."""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from concurrent import futures
from typing import Any

import grpc
import pytest

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import backends
from snakepit_telemetry.telemetry.backends import (
    Backend,
    CompositeBackend,
    GrpcBackend,
    NoneBackend,
    StatsdBackend,
    StderrBackend,
)
from snakepit_telemetry.telemetry.backends.stderr import format_line

from .conftest import drain, names

Event = tuple[tuple[str, ...], dict[str, Any], dict[str, str], int, str]


class Recorder(Backend):
    """Keeps what the default span/emit path hands to ``emit``."""

    name = "recorder"

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def emit(self, parts, measurements, metadata, timestamp_ns, correlation_id) -> None:  # type: ignore[no-untyped-def]
        self.events.append((parts, measurements, metadata, timestamp_ns, correlation_id))


class Exploding(Backend):
    name = "exploding"

    def emit(self, *args: Any) -> None:
        raise RuntimeError("backend bug")

    def span_start(self, *args: Any) -> object:
        raise RuntimeError("backend bug")


# ------------------------------------------------------------------ selection


def test_default_is_stderr_until_served() -> None:
    assert isinstance(telemetry.get_backend(), StderrBackend)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        telemetry.add_to_server(srv)
        assert isinstance(telemetry.get_backend(), GrpcBackend)
    finally:
        srv.stop(0)


def test_set_stream_selects_grpc(stream: telemetry.AnyTelemetryStream) -> None:
    assert isinstance(telemetry.get_backend(), GrpcBackend)
    telemetry.emit("a.b", {"x": 1})
    assert names(drain(stream)) == ["a.b"]


def test_env_choice_wins_over_served(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "none")
    assert isinstance(telemetry.get_backend(), NoneBackend)
    telemetry.set_stream(telemetry.new_stream())  # explicit choice stays
    assert isinstance(telemetry.get_backend(), NoneBackend)


def test_env_list_builds_composite(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, " stderr , NONE,stderr")
    backend = telemetry.get_backend()
    assert isinstance(backend, CompositeBackend)
    assert [b.name for b in backend.backends] == ["stderr", "none"]
    assert set(telemetry.backend_stats()) == {"stderr", "none"}


def test_unknown_names_fall_back_and_are_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(backends.BACKEND_ENV, "kafka")
    assert isinstance(telemetry.get_backend(), StderrBackend)
    monkeypatch.delenv(backends.BACKEND_ENV)  # else each fallback re-reads (and counts) it
    assert isinstance(telemetry.set_backend("nope"), StderrBackend)
    assert isinstance(telemetry.set_backend(["nope", "none"]), NoneBackend)
    assert isinstance(telemetry.set_backend(42), StderrBackend)  # type: ignore[arg-type]
    assert backends.selection_stats()["unknown_names"] == 4


def test_set_backend_instance_and_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder()
    assert telemetry.set_backend(rec) is rec
    assert telemetry.get_backend() is rec
    monkeypatch.setenv(backends.BACKEND_ENV, "none")
    assert isinstance(telemetry.set_backend(None), NoneBackend)


# ------------------------------------------------------------- Backend contract


def test_emit_passes_validated_values() -> None:
    rec = telemetry.set_backend(Recorder())
    assert isinstance(rec, Recorder)
    telemetry.emit(["a", "b"], {"n": True, "f": 1.5, "bad": object()}, {"k": 3, "none": None}, 7)
    telemetry.emit("bad..name", {"x": 1})
    with telemetry.correlation.correlation("ctx"):
        telemetry.emit("c.d", None)
    (parts, meas, meta, ts, cid), (_, _, _, _, cid2) = rec.events
    assert (parts, meas, meta, cid, cid2) == (
        ("a", "b"),
        {"n": 1, "f": 1.5},
        {"k": "3"},
        "7",
        "ctx",
    )
    assert abs(ts - time.time_ns()) < 5e9
    assert rec.stats() == {"emitted": 2, "dropped": 1, "errors": 0}


def test_default_spans_are_events() -> None:
    rec = telemetry.set_backend(Recorder())
    assert isinstance(rec, Recorder)
    with telemetry.span("python.call", {"command": "predict"}, correlation_id="c1"):
        pass
    with pytest.raises(KeyError), telemetry.span("tool.execution", {"error_type": "mine"}):
        raise KeyError("k")
    sp = telemetry.span("rpc")
    sp.__enter__()
    sp.fail("UNAVAILABLE", "down")
    sp2 = telemetry.span("rpc2")
    sp2.__enter__()
    sp2.stop({"result": "success"})
    got = [(".".join(e[0]), sorted(e[1]), e[2], e[4]) for e in rec.events]
    assert got == [
        ("python.call.start", ["system_time"], {"command": "predict"}, "c1"),
        ("python.call.stop", ["duration"], {"command": "predict"}, "c1"),
        ("tool.execution.start", ["system_time"], {"error_type": "mine"}, ""),
        (
            "tool.execution.exception",
            ["duration"],
            {"error_type": "KeyError", "error_message": "'k'"},
            "",
        ),
        ("rpc.start", ["system_time"], {}, ""),
        ("rpc.exception", ["duration"], {"error_type": "UNAVAILABLE", "error_message": "down"}, ""),
        ("rpc2.start", ["system_time"], {}, ""),
        ("rpc2.stop", ["duration"], {"result": "success"}, ""),
    ]


def test_failing_backend_never_raises_nor_stops_others() -> None:
    bad, rec = Exploding(), Recorder()
    telemetry.set_backend([bad, rec])
    telemetry.emit("a.b", {"x": 1})
    with telemetry.span("s"):
        pass
    assert [".".join(e[0]) for e in rec.events] == ["a.b", "s.start", "s.stop"]
    assert bad.stats()["errors"] == 2  # one emit, one span_start (its end is skipped)
    stats = telemetry.backend_stats()
    assert stats["exploding"]["errors"] == 2 and stats["recorder"]["errors"] == 0


def test_none_backend_discards() -> None:
    telemetry.set_backend("none")
    telemetry.emit("a.b", {"x": 1})
    with telemetry.span("s"):
        pass
    assert telemetry.backend_stats() == {"none": {"emitted": 0, "dropped": 0, "errors": 0}}


def test_grpc_and_stderr_composite(stream: telemetry.AnyTelemetryStream) -> None:
    out = io.StringIO()
    err = StderrBackend(out=out)
    telemetry.set_backend(["grpc", err])
    with telemetry.span("python.call", correlation_id="z"):
        telemetry.emit("tool.result_size", {"bytes": 3})
    assert err.flush(2)
    assert names(drain(stream)) == ["python.call.start", "tool.result_size", "python.call.stop"]
    lines = out.getvalue().splitlines()
    assert [json.loads(line.split(" ", 1)[1])["event_parts"][-1] for line in lines] == [
        "start",
        "result_size",
        "stop",
    ]
    assert telemetry.backend_stats()["grpc"]["emitted"] == 3


# ----------------------------------------------------------------------- stderr


def test_stderr_line_format() -> None:
    line = format_line(
        ("python", "call", "stop"),
        {"duration": 1500, "f": 1.0, "n": math.nan, "p": math.inf, "m": -math.inf, "s": "x"},
        {"command": "predict"},
        1700000000000000000,
        "abc",
    )
    assert line == (
        'SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","stop"],'
        '"measurements":{"duration":1500,"f":1.0,"n":"NaN","p":"Infinity","m":"-Infinity",'
        '"s":"x"},"metadata":{"command":"predict"},"timestamp_ns":1700000000000000000,'
        '"correlation_id":"abc"}'
    )
    assert "correlation_id" not in format_line(("a",), {}, {}, 1, "")


def test_stderr_backend_writes_to_sys_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    backend = telemetry.set_backend("stderr")
    assert isinstance(backend, StderrBackend)
    telemetry.emit("python.call.stop", {"duration": 1500}, {"command": "predict"}, "abc")
    assert backend.flush(2)
    (line,) = capsys.readouterr().err.splitlines()
    prefix, body = line.split(" ", 1)
    assert prefix == "SNAKEPIT_TELEMETRY_EVENT"
    event = json.loads(body)
    assert event["event_parts"] == ["python", "call", "stop"]
    assert (event["measurements"], event["metadata"]) == (
        {"duration": 1500},
        {"command": "predict"},
    )
    assert event["correlation_id"] == "abc"
    assert backend.stats()["written"] == 1


def test_stderr_queue_size_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_STDERR_QUEUE", "5")
    assert StderrBackend().stats()["queue_size"] == 5
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_STDERR_QUEUE", "-1")
    assert StderrBackend().stats()["queue_size"] == 1024


def test_stderr_full_pipe_drops_without_blocking() -> None:
    """A pipe nobody reads: the writer blocks, the queue fills, emit stays fast."""
    read_fd, write_fd = os.pipe()
    out = os.fdopen(write_fd, "w")
    backend = StderrBackend(out=out, queue_size=16)
    telemetry.set_backend(backend)
    payload = {"blob": "x" * 1000}  # ~64 lines fill a 64 KiB pipe
    in_emit = slowest = 0.0
    for i in range(3000):
        if i % 100 == 0:
            time.sleep(0.002)  # let the writer run, so it surely reaches the full pipe
        started = time.perf_counter()
        telemetry.emit("python.call.stop", {"duration": 1}, payload)
        took = time.perf_counter() - started
        in_emit += took
        slowest = max(slowest, took)
    stats = backend.stats()
    assert in_emit < 1.0 and slowest < 0.1, (in_emit, slowest)
    assert stats["dropped"] > 2000
    assert stats["emitted"] == 3000
    assert not backend.flush(0.05)  # the writer is stuck in write()
    # Unblock: with the reader gone the write fails (EPIPE) and is counted, not raised.
    os.close(read_fd)
    assert backend.flush(5)
    stats = backend.stats()
    assert stats["errors"] > 0
    assert stats["written"] + stats["errors"] + stats["dropped"] == 3000
    telemetry.emit("a.b", {"x": 1})  # still usable, still silent
    assert backend.flush(5)
    with pytest.raises(OSError):
        out.close()  # its buffer still holds undeliverable bytes


def test_stderr_emit_from_threads_is_counted_exactly() -> None:
    out = io.StringIO()
    backend = StderrBackend(out=out, queue_size=100_000)
    telemetry.set_backend(backend)

    def work() -> None:
        for _ in range(500):
            telemetry.emit("t.e", {"x": 1})

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert backend.flush(5)
    assert len(out.getvalue().splitlines()) == 2000 == backend.stats()["written"]


def test_statsd_selected_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_STATSD_PORT", "9")
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_STATSD_PREFIX", "app")
    backend = telemetry.set_backend("statsd")
    assert isinstance(backend, StatsdBackend)
    assert (backend.host, backend.port, backend.prefix) == ("127.0.0.1", 9, "app")
