"""TelemetryStream over real loopback gRPC: delivery, controls, takeover."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from concurrent import futures

import grpc

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import snakepit_bridge_pb2_grpc as pb_grpc
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal.control import MAX_RULES

from .conftest import Client, wait_until

Connect = Callable[[], Client]


def names(events: list[pb.TelemetryEvent]) -> list[str]:
    return [".".join(e.event_parts) for e in events]


def toggle(enabled: bool) -> pb.TelemetryControl:
    return pb.TelemetryControl(toggle=pb.TelemetryToggle(enabled=enabled))


def sampling(rate: float, *patterns: str) -> pb.TelemetryControl:
    return pb.TelemetryControl(
        sampling=pb.TelemetrySamplingUpdate(sampling_rate=rate, event_patterns=patterns)
    )


def filt(allow: tuple[str, ...] = (), deny: tuple[str, ...] = ()) -> pb.TelemetryControl:
    return pb.TelemetryControl(filter=pb.TelemetryEventFilter(allow=allow, deny=deny))


def send_and_wait(
    client: Client, stream: telemetry.AnyTelemetryStream, control: pb.TelemetryControl
) -> None:
    before = stream.stats()["controls_applied"]
    client.send(control)
    assert wait_until(lambda: stream.stats()["controls_applied"] == before + 1)


def test_client_receives_events(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    telemetry.emit("queued.before.connect", {"n": 1})  # waits in the queue
    client = connect()
    assert wait_until(lambda: stream.stats()["active_stream"])
    telemetry.emit(
        "python.call.stop",
        {"duration": 42, "ratio": 0.5, "nan": math.nan, "label": "ok", "flag": True},
        {"command": "predict", 7: 8},
        correlation_id="corr-1",
    )
    first, second = client.take(2)
    assert names([first]) == ["queued.before.connect"]
    assert list(second.event_parts) == ["python", "call", "stop"]
    m = second.measurements
    assert m["duration"].int_value == 42 and m["duration"].WhichOneof("value") == "int_value"
    assert m["ratio"].float_value == 0.5
    assert math.isnan(m["nan"].float_value)
    assert m["label"].string_value == "ok"
    assert m["flag"].int_value == 1
    assert dict(second.metadata) == {"command": "predict", "7": "8"}
    assert second.correlation_id == "corr-1"
    assert second.timestamp_ns > 0
    assert stream.wait_drained(2)
    st = stream.stats()
    assert st["sent"] == 2 and st["queue_len"] == 0 and st["streams_opened"] == 1


def test_span_over_the_wire(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    try:
        with telemetry.span("tool.execution", {"tool": "x"}):
            raise ValueError("bad input")
    except ValueError:
        pass
    start, exc = client.take(2)
    assert names([start, exc]) == ["tool.execution.start", "tool.execution.exception"]
    assert exc.metadata["error_type"] == "ValueError"
    assert exc.metadata["error_message"] == "bad input"
    assert exc.measurements["duration"].int_value >= 0


def test_toggle(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    send_and_wait(client, stream, toggle(False))
    telemetry.emit("a.b", {"x": 1})
    assert stream.stats()["dropped_disabled"] == 1 and stream.stats()["queue_len"] == 0
    send_and_wait(client, stream, toggle(True))
    telemetry.emit("a.c", {"x": 1})
    assert names(client.take(1)) == ["a.c"]
    client.assert_quiet()


def test_sampling_rules_combine(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    send_and_wait(client, stream, sampling(0.0, "python.call.*"))
    telemetry.emit("python.call.stop", {"x": 1})
    telemetry.emit("tool.execution.stop", {"x": 1})
    assert names(client.take(1)) == ["tool.execution.stop"]
    assert stream.stats()["dropped_sampled"] == 1
    # No patterns: sets the default rate only; the rule above stays.
    send_and_wait(client, stream, sampling(0.0))
    send_and_wait(client, stream, sampling(1.0, "tool.*"))
    for name in ("tool.execution.stop", "python.call.stop", "other.evt"):
        telemetry.emit(name, {"x": 1})
    assert names(client.take(1)) == ["tool.execution.stop"]
    assert stream.stats()["dropped_sampled"] == 3
    # The newest matching rule wins, whatever the order of specificity.
    send_and_wait(client, stream, sampling(1.0, "python.*", "nothing.here"))
    telemetry.emit("python.call.stop", {"x": 1})
    assert names(client.take(1)) == ["python.call.stop"]
    # Same pattern list (same order): replaces the old rule and moves to the end.
    send_and_wait(client, stream, sampling(0.0, "python.*", "nothing.here"))
    telemetry.emit("python.call.stop", {"x": 1})
    assert stream.stats()["dropped_sampled"] == 4
    # Same patterns in another order is a different rule, appended.
    send_and_wait(client, stream, sampling(1.0, "nothing.here", "python.*"))
    telemetry.emit("python.call.stop", {"x": 1})
    assert names(client.take(1)) == ["python.call.stop"]
    assert stream.control_state()["rules"] == [
        {"rate": 0.0, "patterns": ["python.call.*"]},
        {"rate": 1.0, "patterns": ["tool.*"]},
        {"rate": 0.0, "patterns": ["python.*", "nothing.here"]},
        {"rate": 1.0, "patterns": ["nothing.here", "python.*"]},
    ]
    assert stream.control_state()["default_rate"] == 0.0
    client.assert_quiet()


def test_sampling_rates_clamped(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    send_and_wait(client, stream, sampling(7.0, "a.*"))
    send_and_wait(client, stream, sampling(-3.0, "b.*"))
    send_and_wait(client, stream, sampling(math.nan, "c.*"))
    send_and_wait(client, stream, sampling(-0.5))
    rules = stream.control_state()["rules"]
    assert [r["rate"] for r in rules] == [1.0, 0.0, 1.0]
    assert stream.control_state()["default_rate"] == 0.0
    for name in ("a.x", "b.x", "c.x", "d.x"):
        telemetry.emit(name, {"x": 1})
    assert names(client.take(2)) == ["a.x", "c.x"]
    assert stream.stats()["dropped_sampled"] == 2
    client.assert_quiet(0.05)


def test_sampling_rate_statistics(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    send_and_wait(client, stream, sampling(0.5, "python.*"))
    for _ in range(400):
        telemetry.emit("python.call.stop", {"x": 1})
        telemetry.emit("tool.execution.stop", {"x": 1})  # default rate 1.0
    dropped = stream.stats()["dropped_sampled"]
    assert 100 < dropped < 300  # mean 200, sd 10
    got = names(client.take(800 - dropped))
    assert got.count("tool.execution.stop") == 400
    client.assert_quiet(0.05)


def test_too_many_rules_truncated(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    for i in range(40):
        send_and_wait(client, stream, sampling(0.0, f"r{i}.*"))
    rules = stream.control_state()["rules"]
    assert len(rules) == MAX_RULES
    assert [r["patterns"] for r in rules] == [[f"r{i}.*"] for i in range(8, 40)]
    assert stream.stats()["controls_truncated"] == 8
    telemetry.emit("r0.evt", {"x": 1})  # its rule was dropped: default rate
    telemetry.emit("r39.evt", {"x": 1})
    assert names(client.take(1)) == ["r0.evt"]
    # Re-setting an existing rule moves it, it does not grow the list.
    send_and_wait(client, stream, sampling(1.0, "r8.*"))
    assert len(stream.control_state()["rules"]) == MAX_RULES
    assert stream.stats()["controls_truncated"] == 8
    assert stream.control_state()["rules"][-1] == {"rate": 1.0, "patterns": ["r8.*"]}


def test_filter(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    send_and_wait(client, stream, filt(allow=("python.*",), deny=("python.secret.*",)))
    for name in ("python.call.stop", "python.secret.stop", "tool.execution.stop"):
        telemetry.emit(name, {"x": 1})
    assert names(client.take(1)) == ["python.call.stop"]
    assert stream.stats()["dropped_filtered"] == 2
    send_and_wait(client, stream, filt(deny=("tool.*",)))  # empty allow: allow all
    telemetry.emit("tool.execution.stop", {"x": 1})
    telemetry.emit("other.thing", {"x": 1})
    assert names(client.take(1)) == ["other.thing"]
    send_and_wait(client, stream, filt())
    telemetry.emit("tool.execution.stop", {"x": 1})
    assert names(client.take(1)) == ["tool.execution.stop"]
    client.assert_quiet()


def test_malformed_control_keeps_stream(
    stream: telemetry.AnyTelemetryStream, server: str, connect: Connect
) -> None:
    # Raw bytes that are not a valid TelemetryControl, sent with a bytes-level call.
    channel = grpc.insecure_channel(server)
    raw = channel.stream_stream("/snakepit.bridge.BridgeService/StreamTelemetry")
    responses = raw(iter([b"\xff\xff\xff", pb.TelemetryControl().SerializeToString()]))
    assert wait_until(lambda: stream.stats()["internal_errors"] == 2)
    telemetry.emit("still.alive", {"x": 1})
    first = pb.TelemetryEvent.FromString(next(responses))
    assert first.event_parts == ["telemetry", "python", "stats"]  # reported at call start
    assert pb.TelemetryEvent.FromString(next(responses)).event_parts == ["still", "alive"]
    responses.cancel()
    channel.close()


def test_new_call_replaces_old(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    old = connect()
    telemetry.emit("one", {"x": 1})
    assert names(old.take(1)) == ["one"]
    new = connect()
    assert wait_until(lambda: stream.stats()["streams_opened"] == 2)
    # The old call ends promptly once superseded.
    assert old.done.wait(3)
    for i in range(20):
        telemetry.emit(f"after.e{i}", {"x": i})
    got = new.take(20)
    assert names(got) == [f"after.e{i}" for i in range(20)]
    old.assert_quiet(0.05)
    new.assert_quiet()
    # The new call owns the controls now.
    send_and_wait(new, stream, toggle(False))
    new.close()
    assert wait_until(lambda: not stream.stats()["active_stream"])
    # A new call after the previous ended works too (and its controls apply).
    third = connect()
    send_and_wait(third, stream, toggle(True))
    assert stream.stats()["streams_opened"] == 3
    telemetry.emit("again", {"x": 1})
    assert names(third.take(1)) == ["again"]


def test_cancel_ends_handler(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    assert wait_until(lambda: stream.stats()["active_stream"])
    client.close()
    assert wait_until(lambda: not stream.stats()["active_stream"], timeout=3)
    telemetry.emit("kept", {"x": 1})
    assert stream.stats()["queue_len"] == 1  # waits for the next call
    assert names(connect().take(1)) == ["kept"]


def test_add_to_server_beside_other_methods(stream: telemetry.AnyTelemetryStream) -> None:
    def ping(request: bytes, context: grpc.ServicerContext) -> bytes:
        return b"pong:" + request

    other = grpc.method_handlers_generic_handler(
        telemetry.SERVICE_NAME, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    srv.add_generic_rpc_handlers((other,))
    assert telemetry.add_to_server(srv) is stream  # defaults to the default stream
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    client = Client(f"127.0.0.1:{port}")
    try:
        call = client.channel.unary_unary("/snakepit.bridge.BridgeService/Ping")
        assert call(b"hi", timeout=5) == b"pong:hi"
        telemetry.emit("side.by.side", {"x": 1})
        assert names(client.take(1)) == ["side.by.side"]
    finally:
        client.close()
        stream.close()
        srv.stop(0).wait(2)


def test_threads_to_real_client(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    import threading

    client = connect()

    def work(t: int) -> None:
        for i in range(200):
            telemetry.emit("thread.evt", {"i": i}, {"t": t})

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    events = client.take(800)
    per_thread: dict[str, list[int]] = {}
    for e in events:
        per_thread.setdefault(e.metadata["t"], []).append(e.measurements["i"].int_value)
    assert all(v == list(range(200)) for v in per_thread.values()) and len(per_thread) == 4
    assert stream.wait_drained(2) and stream.stats()["sent"] == 800
    client.assert_quiet(0.05)


def test_takeover_from_stalled_client(
    stream: telemetry.AnyTelemetryStream, server: str, connect: Connect
) -> None:
    # A client that never reads, with BDP probing off so its flow-control window
    # stays small: the handler soon blocks in a send with most events in flight.
    # Queued before the call opens, so its handler takes all 1000 in its first batch
    # (emitting while it runs made the batch size depend on thread scheduling).
    payload = {"blob": "x" * 4000}
    for i in range(1000):
        telemetry.emit("bulk.evt", {"i": i}, payload)
    channel = grpc.insecure_channel(server, options=[("grpc.http2.bdp_probe", 0)])
    stalled = pb_grpc.BridgeServiceStub(channel).StreamTelemetry(iter(()))
    assert wait_until(lambda: stream.stats()["active_stream"])
    assert wait_until(lambda: stream.stats()["queue_len"] == 0)
    time.sleep(0.3)
    assert stream.stats()["in_flight"] > 0, "client did not stall; test precondition failed"
    new = connect()
    # After the takeover grace the stalled call is cancelled; what it had not
    # handed to gRPC comes back to the queue and goes to the new call, once.
    assert wait_until(lambda: stream.wait_drained(0), timeout=5)
    settled = -1
    while settled != new.events.qsize():
        settled = new.events.qsize()
        time.sleep(0.3)
    received = [e.measurements["i"].int_value for e in new.take(settled)]
    assert received, "the new call got nothing"
    # A contiguous tail, in order, no duplicates; the head went to the stalled call.
    assert received == list(range(1000 - len(received), 1000))
    # At most the one event interrupted mid-send is lost (counted as not sent).
    stats = stream.stats()
    assert stats["sent"] >= 999
    assert stats["sent"] + stats["interrupted_sends"] == 1000
    stalled.cancel()
    channel.close()
