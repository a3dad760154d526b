"""statsd against a real loopback UDP socket; otel against the SDK's in-memory exporter."""

from __future__ import annotations

import importlib
import socket
import sys
from collections.abc import Iterator

import pytest

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import backends
from snakepit_telemetry.telemetry.backends import NoneBackend, StatsdBackend


@pytest.fixture
def udp() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(2.0)
    yield sock
    sock.close()


def received(sock: socket.socket, packets: int) -> list[str]:
    lines: list[str] = []
    for _ in range(packets):
        lines.extend(sock.recv(65536).decode().split("\n"))
    return lines


def statsd_to(sock: socket.socket, rate: float = 1.0) -> StatsdBackend:
    port = sock.getsockname()[1]
    backend = StatsdBackend("127.0.0.1", port, "snakepit", rate_source=lambda _event: rate)
    telemetry.set_backend(backend)
    return backend


def test_statsd_exact_lines(udp: socket.socket) -> None:
    backend = statsd_to(udp)
    telemetry.emit(
        "python.call.stop",
        {"duration": 1_500_000, "bytes": 42, "ratio": 0.5, "label": "x"},
        {"command": "pre|di,ct#\nx", "a": "1"},
        correlation_id="never-a-tag",
    )
    assert received(udp, 1) == [
        "snakepit.python.call.stop.duration:1.5|ms|#a:1,command:pre_di_ct__x",
        "snakepit.python.call.stop.bytes:42|g|#a:1,command:pre_di_ct__x",
        "snakepit.python.call.stop.ratio:0.5|g|#a:1,command:pre_di_ct__x",
    ]
    telemetry.emit("python.error.occurred", {"system_time": 7}, {})
    assert received(udp, 1) == [
        "snakepit.python.error.occurred.system_time:7|g",
        "snakepit.python.error.occurred.count:1|c",
    ]
    with pytest.raises(ValueError), telemetry.span("tool.execution", {"tool": "t"}):
        raise ValueError("x")
    start, exc = received(udp, 1), received(udp, 1)
    assert start[0].startswith("snakepit.tool.execution.start.system_time:")
    assert exc[0].startswith("snakepit.tool.execution.exception.duration:")
    tags = "|#error_message:x,error_type:ValueError,tool:t"
    assert exc[0].endswith("|ms" + tags)
    assert exc[1] == "snakepit.tool.execution.exception.count:1|c" + tags
    telemetry.emit("a.b", {"nan": float("nan")})  # nothing representable: no packet
    assert backend.stats()["dropped"] == 1
    assert backend.stats()["sent"] == 4 and backend.stats()["errors"] == 0


def test_statsd_sample_rate_annotation(udp: socket.socket) -> None:
    backend = statsd_to(udp, rate=0.999999)
    backend._random.seed(1)
    telemetry.emit("a.b", {"x": 1}, {"k": "v"})
    assert received(udp, 1) == ["snakepit.a.b.x:1|g|@0.999999|#k:v"]
    backend = statsd_to(udp, rate=0.0)
    telemetry.emit("a.b", {"x": 1})
    assert backend.stats()["sampled_out"] == 1


def test_statsd_rate_from_stream_control(
    udp: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "0.5")
    telemetry.set_stream(telemetry.new_stream())
    backend = StatsdBackend("127.0.0.1", udp.getsockname()[1])
    telemetry.set_backend(backend)
    for _ in range(200):
        telemetry.emit("a.b", {"x": 1})
    line = received(udp, 1)[0]
    assert line == "snakepit.a.b.x:1|g|@0.5"
    assert 40 < backend.stats()["sampled_out"] < 160


def test_statsd_socket_errors_are_counted_not_raised(udp: socket.socket) -> None:
    # Broadcast without SO_BROADCAST: sendto itself fails (EACCES).
    backend = StatsdBackend("255.255.255.255", 8125, "p", rate_source=lambda _e: 1.0)
    telemetry.set_backend(backend)
    telemetry.emit("a.b", {"x": 1})
    assert backend.stats()["errors"] == 1
    # Unresolvable host: the backend stays inert and counts every event.
    bad = StatsdBackend("no-such-host.invalid", 8125, "p", rate_source=lambda _e: 1.0)
    telemetry.set_backend(bad)
    telemetry.emit("a.b", {"x": 1})
    assert bad.stats()["errors"] == 1
    # A closed port on loopback: unconnected UDP gets no error back; nothing raises.
    port = udp.getsockname()[1]
    udp.close()
    dead = StatsdBackend("127.0.0.1", port, "p", rate_source=lambda _e: 1.0)
    telemetry.set_backend(dead)
    for _ in range(3):
        telemetry.emit("a.b", {"x": 1})
    assert dead.stats()["sent"] == 3


# ------------------------------------------------------------------------- otel

# The otel extra is part of the test requirements (requirements.txt), so these
# tests always run; a missing package fails them rather than skipping them.
otel_sdk = importlib.import_module("opentelemetry.sdk.trace")
in_memory = importlib.import_module("opentelemetry.sdk.trace.export.in_memory_span_exporter")
export = importlib.import_module("opentelemetry.sdk.trace.export")


@pytest.fixture
def spans() -> Iterator[object]:
    """A private provider (the global one is never set) wired to an in-memory exporter."""
    from snakepit_telemetry.telemetry.backends.otel import OtelBackend

    exporter = in_memory.InMemorySpanExporter()
    provider = otel_sdk.TracerProvider()
    provider.add_span_processor(export.SimpleSpanProcessor(exporter))
    backend = OtelBackend(tracer_provider=provider)
    telemetry.set_backend(backend)
    yield exporter
    provider.shutdown()


def test_otel_spans_and_events(spans: object) -> None:
    from opentelemetry.trace import StatusCode

    with telemetry.span("python.call", {"command": "predict"}, correlation_id="c-1"):
        # The span's explicit ID is not a context ID: the event gets its own.
        telemetry.emit("tool.result_size", {"bytes": 12}, {"tool": "tok"}, "e-1")
    with pytest.raises(KeyError), telemetry.span("tool.execution"):
        raise KeyError("gone")
    call, tool = spans.get_finished_spans()  # type: ignore[attr-defined]
    assert call.name == "python.call"
    assert dict(call.attributes) == {"command": "predict", "snakepit.correlation_id": "c-1"}
    (event,) = call.events
    assert event.name == "tool.result_size"
    assert dict(event.attributes) == {
        "tool": "tok",
        "bytes": 12,
        "snakepit.correlation_id": "e-1",
    }
    assert tool.status.status_code is StatusCode.ERROR
    assert tool.events[0].name == "exception"
    assert tool.events[0].attributes["exception.type"] == "KeyError"


def test_otel_fail_and_emit_without_span(spans: object) -> None:
    telemetry.emit("lonely.event", {"x": 1})
    sp = telemetry.span("rpc")
    sp.__enter__()
    sp.fail("UNAVAILABLE", "down")
    (rpc,) = spans.get_finished_spans()  # type: ignore[attr-defined]
    assert rpc.status.description == "UNAVAILABLE: down"
    assert rpc.events[0].attributes["exception.type"] == "UNAVAILABLE"
    assert telemetry.backend_stats()["otel"]["dropped"] == 1


def test_otel_missing_falls_back_to_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # import now fails
    monkeypatch.delitem(sys.modules, "snakepit_telemetry.telemetry.backends.otel", raising=False)
    assert isinstance(telemetry.set_backend("otel"), NoneBackend)
    assert isinstance(telemetry.set_backend("otel"), NoneBackend)
    assert backends.selection_stats()["unavailable"] == 2
