"""No message over SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES, on either RPC.

An event too large for a message on its own is dropped and counted as
``dropped_oversized`` (and reported); the events around it are sent.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import stream as stream_module

from .conftest import BATCHES_METHOD, BatchClient, Client, wait_until

Serve = Callable[[telemetry.AnyTelemetryStream], str]
CAP = 2000


def make_stream(monkeypatch: pytest.MonkeyPatch, cap: str | None) -> telemetry.AnyTelemetryStream:
    if cap is None:
        monkeypatch.delenv(stream_module.MAX_MESSAGE_BYTES_ENV, raising=False)
    else:
        monkeypatch.setenv(stream_module.MAX_MESSAGE_BYTES_ENV, cap)
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "50")
    s = telemetry.new_stream(queue_size=4096)
    telemetry.set_stream(s)
    return s


def emit_around_a_big_one(n: int) -> None:
    for i in range(n):
        telemetry.emit("python.call.stop", {"duration": i, "seq": i}, {"command": "c" * 50})
        if i == n // 2:
            telemetry.emit("python.call.stop", {"seq": -1}, {"blob": "b" * (CAP * 3)})


class SizedBatchClient(BatchClient):
    """A BatchClient that records the size of every message as it arrived."""

    def __init__(self, address: str) -> None:
        self.sizes: list[int] = []
        super().__init__(address)

    def _open(self, requests: Iterator[pb.TelemetryControl]) -> Any:
        def parse(payload: bytes) -> pb.TelemetryEventBatch:
            self.sizes.append(len(payload))
            return pb.TelemetryEventBatch.FromString(payload)

        method = self.channel.stream_stream(
            BATCHES_METHOD,
            request_serializer=pb.TelemetryControl.SerializeToString,
            response_deserializer=parse,
        )
        return method(requests)


def reported_oversized(client: Client, want: int) -> bool:
    if isinstance(client, BatchClient):
        reports = [e for b in list(client.stats_batches) for e in b.events]
    else:
        reports = []
        while not client.stats.empty():
            reports.append(client.stats.get()[1])
    return any(e.measurements["dropped_oversized"].int_value == want for e in reports)


def test_the_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_stream(monkeypatch, None).stats()["max_message_bytes"] == 4 * 1024 * 1024
    assert make_stream(monkeypatch, "12345").stats()["max_message_bytes"] == 12345
    assert make_stream(monkeypatch, "junk").stats()["max_message_bytes"] == 4 * 1024 * 1024
    assert make_stream(monkeypatch, "0").stats()["max_message_bytes"] == 4 * 1024 * 1024


def test_single_event_rpc_drops_and_counts_an_oversized_event(
    monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    s = make_stream(monkeypatch, str(CAP))
    emit_around_a_big_one(20)
    client = Client(serve(s))
    try:
        events = client.take(20)
        assert [e.measurements["seq"].int_value for e in events] == list(range(20))
        assert all(e.ByteSize() <= CAP for e in events)
        assert wait_until(lambda: s.stats()["dropped_oversized"] == 1)
        assert wait_until(lambda: reported_oversized(client, 1))
        client.assert_quiet()
    finally:
        client.close()
    stats = s.stats()
    assert stats["sent"] == 20 and stats["internal_errors"] == 0
    assert stats["emitted"] == stats["sent"] + stats["dropped_oversized"]


def test_batched_rpc_never_exceeds_the_cap(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    s = make_stream(monkeypatch, str(CAP))
    emit_around_a_big_one(500)
    client = SizedBatchClient(serve(s))
    try:
        events = client.take(500)
        assert [e.measurements["seq"].int_value for e in events] == list(range(500))
        assert wait_until(lambda: reported_oversized(client, 1))
        client.assert_quiet()
        # Many events per batch, none over the cap (stats batches included).
        assert len(client.batches) < 100
        assert client.sizes and max(client.sizes) <= CAP
    finally:
        client.close()
    stats = s.stats()
    assert stats["dropped_oversized"] == 1 and stats["internal_errors"] == 0
    assert stats["emitted"] == stats["sent"] + stats["dropped_oversized"]


def test_batches_stay_within_the_default_batch_size_under_a_large_cap(
    monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    s = make_stream(monkeypatch, None)
    for i in range(3000):
        telemetry.emit("python.call.stop", {"seq": i}, {"blob": "x" * 1000})
    client = SizedBatchClient(serve(s))
    try:
        client.take(3000)
        assert max(client.sizes) <= stream_module.wire.MAX_BATCH_BYTES
        assert len(client.batches) >= 3
    finally:
        client.close()
