"""TelemetryInterceptor on a real loopback server, called by a real client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import correlation
from snakepit_telemetry.telemetry._internal.convert import QueuedEvent

from .conftest import Client, drain, names, wait_until

SERVICE = "snakepit.bridge.BridgeService"
HEADER = telemetry.CORRELATION_HEADER


def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
    telemetry.emit("tool.result_size", {"bytes": len(request)}, {"tool": "unary"})
    if request == b"raise":
        raise ValueError("handler raised")
    if request == b"abort":
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad payload")
    if request == b"set_code":
        context.set_code(grpc.StatusCode.NOT_FOUND)
        context.set_details("nothing here")
        return b""
    return request


def server_stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    for i in range(3):
        time.sleep(0.01)  # the stop's duration must cover the whole iteration
        telemetry.emit("chunk.sent", {"i": i})
        yield b"%d" % i
    if request == b"raise":
        raise RuntimeError("stream broke")
    if request == b"abort":
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too much")


def endless(_request: bytes, _context: grpc.ServicerContext) -> Iterator[bytes]:
    while True:
        yield b"x"
        time.sleep(0.01)


def client_stream(requests: Iterator[bytes], _context: grpc.ServicerContext) -> bytes:
    total = b"".join(requests)
    telemetry.emit("joined", {"bytes": len(total)})
    return total


def bidi(requests: Iterator[bytes], _context: grpc.ServicerContext) -> Iterator[bytes]:
    for item in requests:
        telemetry.emit("echoed", {"bytes": len(item)})
        yield item


def threaded(request: bytes, _context: grpc.ServicerContext) -> bytes:
    """Hands work to threads: only the wrapped one sees the call's correlation ID."""

    def work(label: str) -> None:
        telemetry.emit("thread.work", {"x": 1}, {"label": label})

    for target, label in ((correlation.wrap(work), "wrapped"), (work, "plain")):
        t = threading.Thread(target=target, args=(label,))
        t.start()
        t.join()
    return request


HANDLERS = {
    "Threaded": grpc.unary_unary_rpc_method_handler(threaded),
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "Endless": grpc.unary_stream_rpc_method_handler(endless),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
}


@pytest.fixture
def rpc(stream: telemetry.AnyTelemetryStream) -> Iterator[tuple[grpc.Channel, str]]:
    """A server with the interceptor (one handler thread, to expose context leaks)."""
    srv = grpc.server(
        futures.ThreadPoolExecutor(max_workers=2),
        interceptors=[telemetry.TelemetryInterceptor()],
    )
    telemetry.add_to_server(srv, stream)
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, HANDLERS),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    address = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(address)
    yield channel, address
    channel.close()
    stream.close()
    srv.stop(0).wait(2)


def method(name: str) -> str:
    return f"/{SERVICE}/{name}"


def header(cid: str) -> list[tuple[str, str]]:
    return [(HEADER, cid)]


def take(stream: telemetry.AnyTelemetryStream, n: int) -> list[QueuedEvent]:
    """The next ``n`` queued events (the server may still be finishing the last one)."""
    got: list[QueuedEvent] = []
    assert wait_until(lambda: (got.extend(drain(stream)), len(got) >= n)[1]), names(got)
    assert len(got) == n, names(got)
    return got


def test_unary_success_with_header(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    channel, _ = rpc
    assert channel.unary_unary(method("Unary"))(b"hello", metadata=header("abc")) == b"hello"
    start, inner, stop = take(stream, 3)
    assert names([start, inner, stop]) == [
        "python.call.start",
        "tool.result_size",
        "python.call.stop",
    ]
    assert start.metadata == {"rpc_method": "/snakepit.bridge.BridgeService/Unary"}
    assert start.measurements["system_time"] > 1_600_000_000 * 10**9
    assert stop.metadata == {"rpc_method": method("Unary"), "result": "success"}
    assert stop.measurements["duration"] > 0
    assert {e.correlation_id for e in (start, inner, stop)} == {"abc"}

    # No header: no ID, and nothing left over from the previous call's thread.
    for _ in range(2):
        channel.unary_unary(method("Unary"))(b"again")
    assert {e.correlation_id for e in take(stream, 6)} == {""}


@pytest.mark.parametrize(
    ("payload", "code", "error_type", "message"),
    [
        (b"raise", grpc.StatusCode.UNKNOWN, "ValueError", "handler raised"),
        (b"abort", grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", "bad payload"),
        (b"set_code", grpc.StatusCode.NOT_FOUND, "NOT_FOUND", "nothing here"),
    ],
)
def test_unary_failures(
    stream: telemetry.AnyTelemetryStream,
    rpc: tuple[grpc.Channel, str],
    payload: bytes,
    code: grpc.StatusCode,
    error_type: str,
    message: str,
) -> None:
    channel, _ = rpc
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method("Unary"))(payload, metadata=header("f1"))
    assert info.value.code() is code  # the interceptor did not change the outcome
    start, _inner, exc = take(stream, 3)
    assert names([start, exc]) == ["python.call.start", "python.call.exception"]
    assert exc.metadata == {
        "rpc_method": method("Unary"),
        "error_type": error_type,
        "error_message": message,
    }
    assert exc.measurements["duration"] >= 0
    assert start.correlation_id == exc.correlation_id == "f1"


def test_server_stream_span_covers_iteration(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    channel, _ = rpc
    call = channel.unary_stream(method("ServerStream"))
    assert list(call(b"ok", metadata=header("s1"))) == [b"0", b"1", b"2"]
    events = take(stream, 5)
    assert names(events) == ["python.call.start"] + ["chunk.sent"] * 3 + ["python.call.stop"]
    assert {e.correlation_id for e in events} == {"s1"}
    stop = events[-1]
    assert stop.metadata == {"rpc_method": method("ServerStream"), "result": "success"}
    assert stop.measurements["duration"] >= 30_000_000  # three 10 ms steps


@pytest.mark.parametrize(
    ("payload", "error_type"), [(b"raise", "RuntimeError"), (b"abort", "RESOURCE_EXHAUSTED")]
)
def test_server_stream_failures(
    stream: telemetry.AnyTelemetryStream,
    rpc: tuple[grpc.Channel, str],
    payload: bytes,
    error_type: str,
) -> None:
    channel, _ = rpc
    received = []
    with pytest.raises(grpc.RpcError):
        for item in channel.unary_stream(method("ServerStream"))(payload, metadata=header("s2")):
            received.append(item)
    assert received == [b"0", b"1", b"2"]
    events = take(stream, 5)
    assert names(events)[-1] == "python.call.exception"
    assert events[-1].metadata["error_type"] == error_type
    assert {e.correlation_id for e in events} == {"s2"}


def test_client_stream_and_bidi(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    channel, _ = rpc
    joined = channel.stream_unary(method("ClientStream"))(
        iter([b"ab", b"cd"]), metadata=header("cs")
    )
    assert joined == b"abcd"
    events = take(stream, 3)
    assert names(events) == ["python.call.start", "joined", "python.call.stop"]
    assert {e.correlation_id for e in events} == {"cs"}

    echoed = channel.stream_stream(method("Bidi"))(iter([b"a", b"bb"]), metadata=header("bd"))
    assert list(echoed) == [b"a", b"bb"]
    events = take(stream, 4)
    assert names(events) == ["python.call.start", "echoed", "echoed", "python.call.stop"]
    assert events[-1].metadata == {"rpc_method": method("Bidi"), "result": "success"}
    assert {e.correlation_id for e in events} == {"bd"}


def test_client_cancel_mid_stream(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    channel, _ = rpc
    call = channel.unary_stream(method("Endless"))(b"", metadata=header("cx"))
    assert next(call) == b"x"
    call.cancel()
    got: list[QueuedEvent] = []
    assert wait_until(lambda: (got.extend(drain(stream)), "python.call.exception" in names(got))[1])
    (exc,) = [e for e in got if e.parts[-1] == "exception"]
    assert exc.metadata["error_type"] == "CANCELLED" and exc.correlation_id == "cx"


def test_stream_telemetry_not_intercepted(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    _, address = rpc
    client = Client(address)
    try:
        assert wait_until(lambda: stream.stats()["active_stream"] is True)
        telemetry.emit("marker.evt", {"x": 1})
        assert [".".join(e.event_parts) for e in client.take(1)] == ["marker.evt"]
    finally:
        client.close()
    time.sleep(0.05)
    assert not [n for n in names(drain(stream)) if n.startswith("python.call")]


def test_sampling_keeps_calls_whole(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    stream.apply_control(
        pb.TelemetryControl(
            sampling=pb.TelemetrySamplingUpdate(sampling_rate=0.5, event_patterns=["python.*"])
        )
    )
    channel, _ = rpc
    ping = channel.unary_unary(method("Unary"))
    for i in range(100):
        ping(b"x", metadata=header(f"c{i}"))
    time.sleep(0.05)
    events = [e for e in drain(stream) if e.parts[0] == "python"]
    starts = {e.correlation_id for e in events if e.parts[-1] == "start"}
    stops = {e.correlation_id for e in events if e.parts[-1] == "stop"}
    assert starts == stops and 20 <= len(starts) <= 80  # Binomial(100, 0.5)


class BrokenStream(telemetry.TelemetryStream):
    def sample(self, event: Any) -> bool:
        raise RuntimeError("broken telemetry")

    def emit_event(self, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError("broken telemetry")


def test_broken_telemetry_never_reaches_the_rpc(rpc: tuple[grpc.Channel, str]) -> None:
    telemetry.set_stream(BrokenStream())
    channel, _ = rpc
    assert channel.unary_unary(method("Unary"))(b"ok", metadata=header("z")) == b"ok"
    assert list(channel.unary_stream(method("ServerStream"))(b"ok")) == [b"0", b"1", b"2"]
    with pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(method("Unary"))(b"abort")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_handler_threads_get_id_through_wrap(
    stream: telemetry.AnyTelemetryStream, rpc: tuple[grpc.Channel, str]
) -> None:
    channel, _ = rpc
    assert channel.unary_unary(method("Threaded"))(b"q", metadata=header("th")) == b"q"
    events = take(stream, 4)
    by_label = {e.metadata["label"]: e.correlation_id for e in events if "label" in e.metadata}
    assert by_label == {"wrapped": "th", "plain": ""}
