"""Correlation IDs: contextvar fallback in emit/span and propagation rules."""

from __future__ import annotations

import asyncio
import threading
from concurrent import futures

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import correlation

from .conftest import drain


def test_header_constant() -> None:
    assert telemetry.CORRELATION_HEADER == "x-snakepit-correlation-id"
    assert correlation.CORRELATION_HEADER == telemetry.CORRELATION_HEADER


def test_set_get_reset() -> None:
    assert correlation.get_correlation_id() is None
    token = correlation.set_correlation_id("a")
    inner = correlation.set_correlation_id("b")
    assert correlation.get_correlation_id() == "b"
    correlation.reset_correlation_id(inner)
    assert correlation.get_correlation_id() == "a"
    correlation.reset_correlation_id(token)
    assert correlation.get_correlation_id() is None


def test_context_manager_restores_on_error() -> None:
    try:
        with correlation.correlation("x") as cid:
            assert cid == "x" and correlation.get_correlation_id() == "x"
            raise RuntimeError
    except RuntimeError:
        pass
    assert correlation.get_correlation_id() is None


def test_emit_and_span_use_contextvar(stream: telemetry.AnyTelemetryStream) -> None:
    with correlation.correlation("ctx"):
        telemetry.emit("a.b", {"x": 1})
        telemetry.emit("a.b", {"x": 1}, correlation_id="explicit")
        with telemetry.span("s"):
            pass
        with telemetry.span("s", correlation_id="explicit"):
            pass
    telemetry.emit("a.b", {"x": 1})
    assert [e.correlation_id for e in drain(stream)] == [
        "ctx",
        "explicit",
        "ctx",
        "ctx",
        "explicit",
        "explicit",
        "",
    ]


def test_span_keeps_id_from_enter(stream: telemetry.AnyTelemetryStream) -> None:
    """A span's stop belongs to the same call as its start even if the body changes the ID."""
    with correlation.correlation("outer"), telemetry.span("s"):
        correlation.set_correlation_id("changed")
    assert [e.correlation_id for e in drain(stream)] == ["outer", "outer"]


def test_asyncio_tasks_see_it(stream: telemetry.AnyTelemetryStream) -> None:
    async def child(n: int) -> str | None:
        await asyncio.sleep(0)
        telemetry.emit("task.done", {"n": n})
        return correlation.get_correlation_id()

    async def main() -> list[str | None]:
        with correlation.correlation("async-1"):
            return await asyncio.gather(*(asyncio.create_task(child(i)) for i in range(3)))

    assert asyncio.run(main()) == ["async-1"] * 3
    assert {e.correlation_id for e in drain(stream)} == {"async-1"}


def test_wrap_carries_into_thread_plain_thread_does_not(
    stream: telemetry.AnyTelemetryStream,
) -> None:
    seen: dict[str, str | None] = {}

    def work(label: str) -> None:
        seen[label] = correlation.get_correlation_id()
        telemetry.emit("thread.done", {"x": 1}, {"label": label})

    with correlation.correlation("thr"):
        wrapped = threading.Thread(target=correlation.wrap(work), args=("wrapped",))
        plain = threading.Thread(target=work, args=("plain",))
        for t in (wrapped, plain):
            t.start()
            t.join()
        with futures.ThreadPoolExecutor(2) as pool:
            # The same wrapped callable twice at once: each call gets its own copy.
            list(pool.map(correlation.wrap(work), ["pool-a", "pool-b"]))
    assert seen == {"wrapped": "thr", "plain": None, "pool-a": "thr", "pool-b": "thr"}
    by_label = {e.metadata["label"]: e.correlation_id for e in drain(stream)}
    assert by_label == {"wrapped": "thr", "plain": "", "pool-a": "thr", "pool-b": "thr"}


def test_wrap_isolates_changes() -> None:
    def change() -> str | None:
        correlation.set_correlation_id("inside")
        return correlation.get_correlation_id()

    with correlation.correlation("outside"):
        fn = correlation.wrap(change)
        assert fn() == "inside"
        assert correlation.get_correlation_id() == "outside"
