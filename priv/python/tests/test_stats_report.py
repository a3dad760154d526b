"""telemetry.python.stats events reported to a real client over loopback gRPC."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

import grpc
import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import snakepit_bridge_pb2_grpc as pb_grpc
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal import errors

from .conftest import Client, wait_until
from .test_stream import filt, names, send_and_wait, toggle

Serve = Callable[[telemetry.AnyTelemetryStream], str]

KEYS = {
    "emitted",
    "sent",
    "dropped_queue_full",
    "dropped_invalid",
    "dropped_disabled",
    "dropped_sampled",
    "dropped_filtered",
    "dropped_oversized",
    "measurements_dropped",
    "internal_errors",
    "interrupted_sends",
    "queue_len",
    "refused_calls",
}


def values(event: pb.TelemetryEvent) -> dict[str, int]:
    """Measurements of a stats event, checking its shape on the way."""
    assert list(event.event_parts) == ["telemetry", "python", "stats"]
    assert set(event.measurements) == KEYS
    assert all(v.WhichOneof("value") == "int_value" for v in event.measurements.values())
    assert set(event.metadata) == {"instance_id", "implementation"} and event.correlation_id == ""
    assert event.metadata["implementation"] == telemetry.implementation()
    assert event.timestamp_ns > 1_600_000_000 * 10**9
    return {k: v.int_value for k, v in event.measurements.items()}


def make_stream(
    monkeypatch: pytest.MonkeyPatch, interval_ms: str | None, queue_size: int = 64
) -> telemetry.AnyTelemetryStream:
    if interval_ms is None:
        monkeypatch.delenv("SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", raising=False)
    else:
        monkeypatch.setenv("SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", interval_ms)
    s = telemetry.new_stream(queue_size=queue_size)
    telemetry.set_stream(s)
    return s


def test_reports_first_then_on_change(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, "200", queue_size=2)
    for _ in range(5):
        telemetry.emit("early.evt", {"x": 1})  # 2 queued, 3 dropped: queue full
    address = serve(s)
    # Read raw to see the order: the report comes before the queued events.
    channel = grpc.insecure_channel(address)
    call = pb_grpc.BridgeServiceStub(channel).StreamTelemetry(iter(()))
    try:
        first = values(next(call))
        assert first == dict.fromkeys(KEYS, 0) | {
            "emitted": 5,
            "dropped_queue_full": 3,
            "queue_len": 2,
        }
        assert names([next(call), next(call)]) == ["early.evt", "early.evt"]
        started = time.monotonic()
        second = values(next(call))  # sent changed: reported once the interval passed
        assert time.monotonic() - started >= 0.1  # the first report was ~at call start
        assert second["sent"] == 2 and second["queue_len"] == 0
    finally:
        call.cancel()
        channel.close()
    st = s.stats()
    assert st["sent"] == 2 and st["stats_reports"] == 2


def test_interval_and_idle_checks(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, "300")
    client = Client(serve(s))
    try:
        t0, first = client.take_stats()
        assert values(first)["emitted"] == 0
        # Nothing changes: no further reports.
        time.sleep(0.8)
        assert client.stats.empty()
        # Dropped events change counters without touching the queue; toggle and
        # filters do not apply to the report itself.
        send_and_wait(client, s, toggle(False))
        send_and_wait(client, s, filt(deny=("telemetry.*",)))
        changed = time.monotonic()
        telemetry.emit("telemetry.python.stats", {"x": 1})
        t1, report = client.take_stats(timeout=2)
        assert values(report)["dropped_disabled"] == 1
        assert t1 - changed < 0.3 + 0.5 + 0.3  # idle check at least every 0.5 s
        # Bursts are coalesced: at most one report per interval.
        send_and_wait(client, s, toggle(True))
        send_and_wait(client, s, filt())
        for i in range(20):
            telemetry.emit("burst.evt", {"i": i})
            time.sleep(0.03)
        client.take(20)
        assert wait_until(lambda: s.stats()["sent"] == 20)
        time.sleep(0.7)  # let the final change be reported
        times = [t1]
        while not client.stats.empty():
            t, report = client.stats.get()
            times.append(t)
            last = values(report)
        assert len(times) >= 3
        assert all(b - a >= 0.25 for a, b in zip(times, times[1:], strict=False))
        assert last["sent"] == 20 and last["emitted"] == 21 and last["dropped_disabled"] == 1
        time.sleep(0.7)
        assert client.stats.empty()
        assert s.stats()["stats_reports"] == len(times) + 1
        assert s.stats()["sent"] == 20  # reports are never counted as sent
        assert t0 < t1
    finally:
        client.close()


def test_default_interval(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, None)
    client = Client(serve(s))
    try:
        t0, _ = client.take_stats()
        telemetry.emit("one.evt", {"x": 1})
        client.take(1)
        t1, report = client.take_stats(timeout=3)
        assert t1 - t0 >= 0.9
        assert values(report)["sent"] == 1
    finally:
        client.close()


def test_zero_disables(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, "0")
    client = Client(serve(s))
    try:
        telemetry.emit("only.evt", {"x": 1})
        assert names(client.take(1)) == ["only.evt"]
        time.sleep(0.6)
        assert client.stats.empty()
        assert s.stats()["stats_reports"] == 0
    finally:
        client.close()


def test_each_call_reports_at_start(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, "5000")
    address = serve(s)
    for n in (1, 2):
        client = Client(address)
        try:
            _, report = client.take_stats()
            assert values(report)["emitted"] == n - 1
            telemetry.emit("per.call", {"x": 1})
            client.take(1)
        finally:
            client.close()
        assert wait_until(lambda: not s.stats()["active_stream"])
    assert s.stats()["stats_reports"] == 2


def test_reports_name_their_instance(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, "5000")
    other = telemetry.new_stream(queue_size=4)
    assert len(s.instance_id) == 16 and s.instance_id != other.instance_id
    address = serve(s)
    for _ in (1, 2):  # the same instance on every call
        client = Client(address)
        try:
            _, report = client.take_stats()
            assert dict(report.metadata) == {
                "instance_id": s.instance_id,
                "implementation": s.implementation,
            }
        finally:
            client.close()
        assert wait_until(lambda: not s.stats()["active_stream"])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_starts_over_as_a_new_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_stream(monkeypatch, "0", queue_size=2)
    for _ in range(5):
        telemetry.emit("before.fork", {"x": 1})  # 2 queued, 3 dropped: queue full
    parent_id = s.instance_id
    errors.count(4)  # failures outside any stream, counted process-wide
    parent_errors = errors.total()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave without running pytest's teardown
        try:
            os.close(read_end)
            s.emit_event("in.child", {"x": 1})
            out = {"id": s.instance_id, "stats": s.stats()}
            os.write(write_end, json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        child = json.loads(pipe.read())
    os.waitpid(pid, 0)

    assert child["id"] != parent_id
    stats = child["stats"]
    assert stats["emitted"] == 1 and stats["queue_len"] == 1
    assert stats["dropped_queue_full"] == 0 and stats["sent"] == 0
    # The child counts its own failures: the parent's are reported by the parent.
    assert stats["process_internal_errors"] == 0
    # The parent is unchanged.
    assert s.instance_id == parent_id
    parent = s.stats()
    assert parent["process_internal_errors"] == parent_errors >= 4
    assert parent["emitted"] == 5 and parent["dropped_queue_full"] == 3 and parent["queue_len"] == 2
