"""Samplers, the GC hook, report_error and the tool decorator."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Iterator

import pytest

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import correlation, gc_events, samplers
from snakepit_telemetry.telemetry._internal.convert import QueuedEvent

from .conftest import drain, names, wait_until


@pytest.fixture(autouse=True)
def _cleanup() -> Iterator[None]:
    yield
    telemetry.stop_samplers()
    telemetry.uninstall_gc_hook()


# ------------------------------------------------------------------ samplers


def test_samplers_emit_memory_and_cpu(stream: telemetry.AnyTelemetryStream) -> None:
    assert telemetry.start_samplers(0.02) is True
    assert telemetry.start_samplers(0.02) is True  # idempotent: still one thread
    deadline = time.monotonic() + 0.1
    while time.monotonic() < deadline:
        pass  # burn CPU so the next sample shows some
    got: list[QueuedEvent] = []
    assert wait_until(
        lambda: (
            got.extend(drain(stream)),
            names(got).count("python.cpu.sampled") >= 3,
        )[1]
    )
    memory = [e for e in got if e.parts == ("python", "memory", "sampled")]
    cpu = [e for e in got if e.parts == ("python", "cpu", "sampled")]
    assert memory and len(names(got)) == len(memory) + len(cpu)
    m = memory[0].measurements
    assert set(m) == {"rss_bytes", "peak_rss_bytes"}
    assert 1_000_000 < m["rss_bytes"] <= m["peak_rss_bytes"]
    assert all(type(v) is int for v in m.values())
    c = cpu[0].measurements
    assert set(c) == {"cpu_percent", "cpu_time"}
    assert type(c["cpu_percent"]) is float and type(c["cpu_time"]) is int
    assert max(e.measurements["cpu_percent"] for e in cpu) > 10.0
    assert all(0 <= e.measurements["cpu_percent"] < 100.0 * 64 for e in cpu)
    assert all(e.correlation_id == "" and e.metadata == {} for e in got)

    telemetry.stop_samplers()
    telemetry.stop_samplers()
    assert not samplers.samplers_running()
    drain(stream)
    time.sleep(0.06)
    assert drain(stream) == []


def test_samplers_cpu_time_matches_busy_work() -> None:
    sampler = samplers._Sampler(1.0)
    s = telemetry.new_stream()
    telemetry.set_stream(s)
    before = time.process_time_ns()
    deadline = time.monotonic() + 0.05
    while time.monotonic() < deadline:
        pass
    burned = time.process_time_ns() - before
    sampler.sample()
    _, cpu = drain(s)
    assert cpu.measurements["cpu_time"] >= burned > 0
    assert cpu.measurements["cpu_percent"] > 0.0


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [(None, 10.0), ("250", 0.25), ("0", 0.0), ("bogus", 10.0), ("-5", 10.0), (" ", 10.0)],
)
def test_sampler_interval_env(monkeypatch: pytest.MonkeyPatch, raw: str | None, seconds: float):
    if raw is None:
        monkeypatch.delenv(samplers.SAMPLER_INTERVAL_ENV, raising=False)
    else:
        monkeypatch.setenv(samplers.SAMPLER_INTERVAL_ENV, raw)
    assert samplers.sampler_interval_from_env() == seconds


def test_samplers_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(samplers.SAMPLER_INTERVAL_ENV, "0")
    assert telemetry.start_samplers() is False
    assert telemetry.start_samplers(0) is False
    assert not samplers.samplers_running()


def test_read_memory_without_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(samplers, "_rss_bytes", lambda: None)
    assert set(samplers.read_memory()) == {"peak_rss_bytes"}
    monkeypatch.setattr(samplers, "resource", None)
    assert samplers.read_memory() == {}


# ------------------------------------------------------------------ GC hook


class Cycle:
    def __init__(self) -> None:
        self.me = self


def test_gc_events(stream: telemetry.AnyTelemetryStream) -> None:
    telemetry.install_gc_hook()
    telemetry.install_gc_hook()  # idempotent: one callback
    assert gc.callbacks.count(gc_events._on_gc) == 1
    for _ in range(50):
        Cycle()
    collected = gc.collect()
    assert gc_events.flush_gc_events()
    got = [e for e in drain(stream) if e.parts == ("python", "gc", "completed")]
    full = [e for e in got if e.metadata == {"generation": "2"}]
    assert full, names(got)
    last = full[-1]
    assert set(last.measurements) == {"duration", "collected", "uncollectable"}
    assert last.measurements["collected"] == collected >= 50
    assert last.measurements["uncollectable"] == 0
    assert 0 < last.measurements["duration"] < 10**10
    gc.collect(0)
    assert gc_events.flush_gc_events()
    assert {"generation": "0"} in [e.metadata for e in drain(stream)]

    telemetry.uninstall_gc_hook()
    telemetry.uninstall_gc_hook()
    assert gc_events._on_gc not in gc.callbacks
    gc.collect()
    time.sleep(0.02)
    assert drain(stream) == []


def test_gc_reinstall_after_uninstall(stream: telemetry.AnyTelemetryStream) -> None:
    for _ in range(3):
        telemetry.install_gc_hook()
        telemetry.uninstall_gc_hook()
    telemetry.install_gc_hook()
    gc.collect()
    assert gc_events.flush_gc_events()
    assert "python.gc.completed" in names(drain(stream))


def test_gc_callback_never_raises() -> None:
    gc_events._on_gc("stop", None)  # type: ignore[arg-type]
    gc_events._on_gc("weird", {})


@pytest.mark.parametrize(
    ("raw", "on"), [(None, False), ("true", True), ("TRUE", True), ("false", False), ("x", False)]
)
def test_gc_env(monkeypatch: pytest.MonkeyPatch, raw: str | None, on: bool) -> None:
    if raw is None:
        monkeypatch.delenv(gc_events.GC_EVENTS_ENV, raising=False)
    else:
        monkeypatch.setenv(gc_events.GC_EVENTS_ENV, raw)
    assert gc_events.gc_events_from_env() is on


# ------------------------------------------------------- report_error and tool


def test_report_error(stream: telemetry.AnyTelemetryStream) -> None:
    with correlation.correlation("e1"):
        telemetry.report_error(KeyError("k" * 3000), {"tool": "t", "error_type": "ignored"})
    (event,) = drain(stream)
    assert event.parts == ("python", "error", "occurred")
    assert set(event.measurements) == {"system_time"}
    assert event.measurements["system_time"] > 1_600_000_000 * 10**9
    assert event.metadata["tool"] == "t" and event.metadata["error_type"] == "KeyError"
    assert len(event.metadata["error_message"]) == 1024
    assert event.correlation_id == "e1"


def test_tool_decorator(stream: telemetry.AnyTelemetryStream) -> None:
    @telemetry.tool("adder")
    def add(a: int, b: int) -> int:
        """Adds."""
        return a + b

    @telemetry.tool("broken")
    def broken() -> None:
        raise ValueError("nope")

    assert add(2, 3) == 5 and add.__name__ == "add" and add.__doc__ == "Adds."
    assert names(drain(stream)) == ["tool.execution.start", "tool.execution.stop"]
    with pytest.raises(ValueError, match="nope"):
        broken()
    start, exc, error = drain(stream)
    assert names([start, exc, error]) == [
        "tool.execution.start",
        "tool.execution.exception",
        "python.error.occurred",
    ]
    assert start.metadata == {"tool": "broken"}
    assert exc.metadata == {"tool": "broken", "error_type": "ValueError", "error_message": "nope"}
    assert error.metadata == {"tool": "broken", "error_type": "ValueError", "error_message": "nope"}


def test_tool_decorator_async(stream: telemetry.AnyTelemetryStream) -> None:
    @telemetry.tool("slow")
    async def slow(fail: bool) -> str:
        await asyncio.sleep(0.01)
        if fail:
            raise RuntimeError("async fail")
        return "done"

    assert asyncio.run(slow(False)) == "done"
    stop = drain(stream)[-1]
    assert stop.parts[-1] == "stop" and stop.measurements["duration"] >= 10_000_000
    with pytest.raises(RuntimeError):
        asyncio.run(slow(True))
    assert names(drain(stream))[-1] == "python.error.occurred"
