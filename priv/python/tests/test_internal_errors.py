"""Every failure emit, span and the backends swallow is counted, and reported.

Each test forces one path to fail (monkeypatch), checks that the caller sees
nothing (or only its own exception) and that the count rises; the last ones
check that the count reaches the ``telemetry.python.stats`` report.
"""

from __future__ import annotations

import io
import queue
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import backends, gc_events, interceptor, samplers
from snakepit_telemetry.telemetry._internal import core, errors
from snakepit_telemetry.telemetry.backends import Backend, CompositeBackend, StderrBackend

from .conftest import Client, fast_path, wait_until

Serve = Callable[[telemetry.AnyTelemetryStream], str]


class Boom(Exception):
    pass


def boom(*_args: Any, **_kwargs: Any) -> Any:
    raise Boom("internal failure")


class Recording(Backend):
    """A backend that records what reaches it and can be told to fail."""

    name = "recording"

    def __init__(self, fail: str = "") -> None:
        super().__init__()
        self.fail = fail
        self.events: list[tuple[str, ...]] = []

    def emit(self, parts: tuple[str, ...], *_rest: Any) -> None:
        if self.fail == "emit":
            raise Boom("emit")
        self.events.append(parts)


class BadMapping(Mapping[str, Any]):
    """A mapping whose every read fails."""

    def __getitem__(self, key: str) -> Any:
        raise Boom("getitem")

    def __iter__(self) -> Iterator[str]:
        raise Boom("iter")

    def __len__(self) -> int:
        return 1


def test_emit_that_cannot_reach_a_backend_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "get_backend", boom)
    before = errors.total()
    telemetry.emit("python.call.stop", {"duration": 1})
    telemetry.emit(("python", "call", "stop"), {"duration": 1}, correlation_id="c")
    assert errors.total() == before + 2


def test_emit_with_a_failing_correlation_lookup_is_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(core, "get_correlation_id", boom)
    backends.set_backend(Recording())
    before = errors.total()
    telemetry.emit("python.call.stop", {"duration": 1})
    assert errors.total() == before + 1


def test_backend_emit_failure_counts_in_the_backend_and_the_process() -> None:
    backend = Recording(fail="emit")
    backends.set_backend(backend)
    before = errors.total()
    telemetry.emit("python.call.stop", {"duration": 1})
    assert backend.stats()["errors"] == 1
    assert errors.total() == before + 1


def test_composite_member_failure_is_counted_and_the_others_still_get_it() -> None:
    bad, good = Recording(fail="emit"), Recording()
    backends.set_backend(CompositeBackend([bad, good]))
    before = errors.total()
    telemetry.emit("python.call.stop", {"duration": 1})
    assert good.events == [("python", "call", "stop")]
    assert errors.total() == before + 1


def test_span_enter_failure_is_counted_and_the_body_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(backends, "get_backend", boom)
    before = errors.total()
    ran = False
    with telemetry.span("tool.execution", {"tool": "t"}):
        ran = True
    assert ran
    # Enter failed before anything started, so the end has nothing to fail.
    assert errors.total() == before + 1


def test_span_with_unreadable_metadata_is_counted() -> None:
    backend = Recording()
    backends.set_backend(backend)
    before = errors.total()
    with telemetry.span("tool.execution", BadMapping()):
        pass
    assert errors.total() == before + 1
    assert backend.events[-1] == ("tool", "execution", "stop")


def test_span_end_failure_is_counted_and_the_users_exception_propagates(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backend = Recording()
    backends.set_backend(backend)
    monkeypatch.setattr(backend, "handle_span_end", boom)
    before = errors.total()
    with pytest.raises(ValueError, match="user"), telemetry.span("tool.execution"):
        raise ValueError("user")
    assert errors.total() == before + 1


def test_fast_span_end_failure_is_counted(
    monkeypatch: pytest.MonkeyPatch, stream: telemetry.AnyTelemetryStream
) -> None:
    # The grpc fast path (span -> queue directly) fails at the exception end.
    backends.set_backend("grpc")
    assert fast_path(stream)
    monkeypatch.setattr(backends, "error_fields", boom)
    before = errors.total()
    with pytest.raises(KeyError), telemetry.span("tool.execution"):
        raise KeyError("user")
    assert errors.total() == before + 1


def test_report_error_with_unreadable_metadata_still_reports() -> None:
    backend = Recording()
    backends.set_backend(backend)
    before = errors.total()
    telemetry.report_error(RuntimeError("x"), BadMapping())
    assert backend.events == [("python", "error", "occurred")]
    assert errors.total() == before + 1


def test_stderr_writer_failures_are_counted() -> None:
    class Broken(io.StringIO):
        def write(self, _text: str) -> int:
            raise OSError("pipe closed")

    backend = StderrBackend(out=Broken())
    backends.set_backend(backend)
    before = errors.total()
    telemetry.emit("python.call.stop", {"duration": 1})
    assert backend.flush(5.0)
    assert backend.stats()["errors"] == 1
    assert errors.total() == before + 1


def test_backend_change_listener_failure_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "_listeners", [*backends._listeners, boom])
    before = errors.total()
    backends.set_backend(Recording())
    assert errors.total() > before


def test_sampler_gc_hook_and_interceptor_failures_are_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = errors.total()
    monkeypatch.setattr(samplers, "read_memory", boom)
    samplers._Sampler(1.0).sample()  # never started: one sample on this thread
    assert errors.total() == before + 1

    # The GC hook's drainer: one recorded collection, then the stop marker.
    monkeypatch.setattr(gc_events, "emit", boom)
    pending: queue.SimpleQueue[Any] = queue.SimpleQueue()
    pending.put((1, 0, 0, 0))
    pending.put(gc_events._STOP)
    gc_events._drain(pending)
    assert errors.total() == before + 2

    monkeypatch.setattr(interceptor, "span", boom)
    call = interceptor._Call("python.call", "/svc/Method", None)
    assert call.run(lambda: 42) == 42  # the handler still runs, without a span
    assert errors.total() == before + 3


def test_the_stats_report_carries_process_wide_failures(
    monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "50")
    s = telemetry.new_stream(queue_size=16)
    telemetry.set_stream(s)
    # Three failures outside any stream (emit without a backend).
    with monkeypatch.context() as m:
        m.setattr(backends, "get_backend", boom)
        m.setattr(backends, "_current", None)
        backends.notify_change()  # no fast path: emit goes through get_backend
        for _ in range(3):
            telemetry.emit("python.call.stop", {"duration": 1})
    backends.notify_change()
    assert s.stats()["process_internal_errors"] == 3
    assert s.stats()["internal_errors"] == 0  # the stream's own
    client = Client(serve(s))
    try:
        _, report = client.take_stats()
        assert report.measurements["internal_errors"].int_value == 3
        # One more, after the call opened: the next report has it.
        with monkeypatch.context() as m:
            m.setattr(backends, "get_backend", boom)
            m.setattr(backends, "_current", None)
            backends.notify_change()
            telemetry.emit("python.call.stop", {"duration": 1})
        backends.notify_change()

        def reported_four() -> bool:
            while not client.stats.empty():
                _, event = client.stats.get()
                if event.measurements["internal_errors"].int_value == 4:
                    return True
            return False

        assert wait_until(reported_four)
    finally:
        client.close()
