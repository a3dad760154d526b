"""Span ids and tracebacks: what Elixir turns into telemetry_span_context and stacktrace."""

from __future__ import annotations

import gc
import io
import json
import os
import weakref
from typing import Any

import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal import convert, core, spans, wire
from snakepit_telemetry.telemetry.backends import StderrBackend

from .conftest import NATIVE, drain, names


class Boom(Exception):
    pass


def _raise_at(depth: int) -> None:
    if depth <= 0:
        raise Boom("deep")
    _raise_at(depth - 1)


def run_span(name: str, fail: bool, depth: int = 0) -> None:
    try:
        with telemetry.span(name, {"tool": "t"}):
            if fail:
                _raise_at(depth)
    except Boom:
        pass


def test_span_ids_are_nonzero_64_bit_and_unique() -> None:
    ids = [spans.new_span_id() for _ in range(100_000)]
    assert len(set(ids)) == len(ids)
    assert all(0 < i < 2**64 for i in ids)


@pytest.mark.parametrize("backend", ["fast", "grpc"])
def test_a_span_shares_its_id_and_every_span_has_its_own(
    stream: telemetry.AnyTelemetryStream,
    backend: str,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    if backend == "grpc":
        # The backend path (GrpcBackend.handle_span_*), as when controls sample
        # (the native implementation's spans take it without a native default).
        if NATIVE:
            # Native spans start in the extension only while it has a default stream.
            native = core._native
            assert native is not None
            previous = native.default_stream()
            native.set_default(None)
            monkeypatch.setattr(core, "_native_stream", None)
            monkeypatch.setattr(core, "_fast_stream", None)
            request.addfinalizer(lambda: native.set_default(previous))
        else:
            monkeypatch.setattr(stream, "_fast_cap", 0)
    run_span("tool.execution", fail=False)
    run_span("tool.execution", fail=True)
    run_span("tool.execution", fail=False)
    events = drain(stream)
    assert names(events) == [
        "tool.execution.start",
        "tool.execution.stop",
        "tool.execution.start",
        "tool.execution.exception",
        "tool.execution.start",
        "tool.execution.stop",
    ]
    pairs = [events[i : i + 2] for i in range(0, 6, 2)]
    for start, end in pairs:
        assert start.span_id != 0 and start.span_id == end.span_id
        assert start.stacktrace == ()
    assert len({start.span_id for start, _ in pairs}) == 3
    assert pairs[0][1].stacktrace == () and pairs[2][1].stacktrace == ()
    # The exception event: innermost frame first, the raising function.
    stack = pairs[1][1].stacktrace
    assert stack[0][2] == "_raise_at" and stack[-1][2] == "run_span"
    assert all(file.endswith("test_spans.py") and line > 0 for file, line, _ in stack)


@pytest.mark.native_only
def test_native_span_runs_in_the_extension_and_keeps_its_own_metadata(
    stream: telemetry.AnyTelemetryStream,
) -> None:
    telemetry.get_backend()  # resolve the lazily chosen grpc backend: the fast path
    meta = {"tool": "t"}
    sp = telemetry.span("python.call", meta, correlation_id="c-1")
    meta["tool"] = "changed"  # the span copied its metadata when it was made
    with sp:
        assert sp._backend is core._NATIVE_SPAN
        assert sp._native_active
    other = spans.new_span_id()
    with telemetry.span("python.call") as second:
        pass
    start, stop, start2, stop2 = drain(stream)
    assert names([start, stop]) == ["python.call.start", "python.call.stop"]
    assert start.metadata == stop.metadata == {"tool": "t"}
    assert start.correlation_id == stop.correlation_id == "c-1"
    assert start.span_id == stop.span_id == sp._span_id != 0
    # One counter for spans of both paths: ids never repeat.
    assert len({sp._span_id, other, second._span_id}) == 3
    assert start2.span_id == stop2.span_id == second._span_id
    assert stop.measurements["duration"] >= 0


def test_a_span_in_a_reference_cycle_is_collected(stream: telemetry.AnyTelemetryStream) -> None:
    class Held:
        pass

    telemetry.get_backend()
    sp = telemetry.span("python.call", {"k": 1})
    with sp:
        pass
    drain(stream)  # the pure stream's queued events hold the metadata dict itself
    held = Held()
    ref = weakref.ref(held)
    sp._metadata["held"] = held
    sp._token = [sp]  # a cycle through the span
    del sp, held
    gc.collect()
    assert ref() is None


def test_plain_events_have_no_span_id(stream: telemetry.AnyTelemetryStream) -> None:
    telemetry.emit("tool.result_size", {"bytes": 1})
    (event,) = drain(stream)
    assert (event.span_id, event.stacktrace) == (0, ())


def test_a_deep_traceback_keeps_the_innermost_frames(stream: telemetry.AnyTelemetryStream) -> None:
    run_span("python.call", fail=True, depth=200)
    _, exc = drain(stream)
    assert len(exc.stacktrace) == spans.MAX_FRAMES
    assert all(frame[2] == "_raise_at" for frame in exc.stacktrace)
    assert exc.metadata["error_type"] == "Boom"


def test_frame_strings_are_bounded_and_valid_utf8() -> None:
    long_file = "/" + "d" * 5000 + "/\udcff_tool.py"  # lone surrogate: undecodable name
    code = compile("def f():\n    raise ValueError('x')\n", long_file, "exec")
    scope: dict[str, Any] = {}
    exec(code, scope)  # noqa: S102 - builds a function whose code has that file name
    try:
        scope["f"]()
    except ValueError as exc:
        frames = spans.frames(exc)
    file, line, function = frames[0]
    assert function == "f" and line == 2
    assert len(file) <= spans.MAX_FRAME_CHARS and file.endswith("?_tool.py")
    file.encode("utf-8")  # strict: would raise on a surrogate


def test_frames_of_a_failure_without_traceback_are_empty() -> None:
    assert spans.frames(None) == ()
    assert spans.frames(ValueError("never raised")) == ()


def test_a_forked_child_draws_new_span_ids() -> None:
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next ids, then leave at once
        try:
            ids = [spans.new_span_id() for _ in range(3)]
            os.write(write, json.dumps(ids).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        child = json.loads(f.read())
    os.waitpid(pid, 0)
    parent = [spans.new_span_id() for _ in range(3)]
    # Without a new base the child would have produced exactly these ids.
    assert set(child).isdisjoint(parent)
    assert len(set(child)) == 3


@pytest.mark.python_only("wire.BatchEncoder's span id and traceback fields (test_conformance.py)")
def test_span_id_and_traceback_on_the_wire_match_protobuf() -> None:
    stack = (("a.py", 3, "f"), ("", 0, "g"))
    raw = (("python", "call", "exception"), {"duration": 1}, {}, "c", 5, 2**64 - 1, stack)
    payload = wire.BatchEncoder().encode([raw])[0]
    (event,) = pb.TelemetryEventBatch.FromString(payload).events
    assert event.span_id == 2**64 - 1
    assert [(f.file, f.line, f.function) for f in event.stacktrace] == list(stack)
    converted, _, _ = convert.from_raw(raw)
    assert converted is not None
    expected = convert.to_proto(converted)
    expected.timestamp_ns = 0  # in a batch: the offset from base_timestamp_ns (5)
    assert expected == event


def test_stderr_lines_carry_span_id_and_traceback() -> None:
    out = io.StringIO()
    backend = StderrBackend(out=out)
    telemetry.set_backend(backend)
    run_span("tool.execution", fail=True, depth=2)
    assert backend.flush(2)
    start, exc = (json.loads(line.split(" ", 1)[1]) for line in out.getvalue().splitlines())
    assert start["event_parts"][-1] == "start" and exc["event_parts"][-1] == "exception"
    assert start["span_id"] == exc["span_id"] > 0
    assert "stacktrace" not in start
    assert [f["function"] for f in exc["stacktrace"]] == ["_raise_at"] * 3 + ["run_span"]
    assert all(set(f) == {"file", "line", "function"} for f in exc["stacktrace"])


def test_a_backend_without_emit_span_event_still_gets_spans() -> None:
    seen: list[tuple[str, ...]] = []

    class Plain(telemetry.Backend):
        def emit(self, parts: tuple[str, ...], *_: Any) -> None:
            seen.append(parts)

    telemetry.set_backend(Plain())
    run_span("tool.execution", fail=True)
    assert [p[-1] for p in seen] == ["start", "exception"]


def test_interceptor_failures_carry_the_handler_traceback(
    stream: telemetry.AnyTelemetryStream,
) -> None:
    span = telemetry.span("python.call", {"rpc_method": "M"})
    span.__enter__()
    try:
        _raise_at(1)
    except Boom as exc:
        span.fail("Boom", "deep", traceback=exc.__traceback__)
    _, exc_event = drain(stream)
    assert exc_event.metadata["error_type"] == "Boom"
    assert [f[2] for f in exc_event.stacktrace][:2] == ["_raise_at", "_raise_at"]
