"""StreamTelemetryBatches end to end, the lock-free emit path and its counters."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import stream as stream_module

from .conftest import FAST_SPAN as FAST_SPAN
from .conftest import NATIVE, STATS_PARTS, BatchClient, Client, fast_path, idle, wait_until
from .test_stream import filt, sampling, toggle
from .test_wire import EDGE_CASES, normal

Serve = Callable[[telemetry.AnyTelemetryStream], str]

DROPS = (
    "dropped_queue_full",
    "dropped_invalid",
    "dropped_disabled",
    "dropped_sampled",
    "dropped_filtered",
)


@pytest.fixture
def big() -> Iterator[telemetry.AnyTelemetryStream]:
    """A default stream large enough that a burst of 20,000 events is never dropped."""
    s = telemetry.new_stream(queue_size=50_000)
    telemetry.set_stream(s)
    yield s
    s.close()


@pytest.fixture
def clients() -> Iterator[Callable[[str], BatchClient]]:
    made: list[BatchClient] = []

    def make(address: str) -> BatchClient:
        client = BatchClient(address)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def seqs(events: list[pb.TelemetryEvent]) -> list[int]:
    return [e.measurements["seq"].int_value for e in events]


def drops(stats: dict[str, int | bool]) -> int:
    return sum(int(stats[k]) for k in DROPS)


def resolve_fast(s: telemetry.AnyTelemetryStream) -> None:
    """Resolve the (lazily chosen) grpc backend, so the first span is a fast one too."""
    telemetry.get_backend()
    assert fast_path(s)


def test_batches_end_to_end(
    big: telemetry.AnyTelemetryStream, serve: Serve, clients: Callable[[str], BatchClient]
) -> None:
    n = 20_000
    client = clients(serve(big))
    client.send(toggle(True))
    assert wait_until(lambda: big.stats()["controls_applied"] == 1)
    before = time.time_ns()
    for i in range(n):
        telemetry.emit("bulk.evt", {"seq": i, "ratio": 0.5}, {"k": "v"}, "cid")
    after = time.time_ns()
    assert fast_path(big)  # the inlined (or native) fast path was in use

    events = client.take(n, timeout=10)
    assert seqs(events) == list(range(n))  # each exactly once, in order
    stamps = [e.timestamp_ns for e in events]  # absolute: base + offset
    # The native clock interpolates the wall clock from the TSC: within about a
    # microsecond of it, either side (the clock's own test allows 20 us).
    slack = 20_000 if NATIVE else 0
    assert before - slack <= stamps[0] and stamps == sorted(stamps)
    assert stamps[-1] <= after + slack
    first = events[0]
    assert list(first.event_parts) == ["bulk", "evt"] and dict(first.metadata) == {"k": "v"}
    assert first.correlation_id == "cid" and first.measurements["ratio"].float_value == 0.5
    time.sleep(0.05)
    assert client.events.empty(), "unexpected extra event"

    # Batching happened, and the counters match what the client saw.
    assert wait_until(lambda: big.stats()["batches_sent"] == len(client.batches))
    assert n / stream_module.MAX_BATCH_EVENTS <= len(client.batches) <= n / 10
    assert [e.measurements["seq"].int_value for b in client.batches for e in b.events] == seqs(
        events
    )
    stats = big.stats()
    assert stats["sent"] == stats["emitted"] == stats["enqueued"] == n
    assert stats["queue_len"] == 0 and stats["in_flight"] == 0 and drops(stats) == 0

    # Stats reports arrive as batches too: one event each, all counters as ints.
    assert client.stats_batches, "no stats report (one is due when the call starts)"
    assert wait_until(lambda: big.stats()["stats_reports"] == len(client.stats_batches))
    for batch in client.stats_batches:
        (report,) = batch.events
        assert list(report.event_parts) == STATS_PARTS
        assert set(report.measurements) == set(stream_module.STATS_MEASUREMENTS)
        assert all(v.WhichOneof("value") == "int_value" for v in report.measurements.values())
        assert dict(report.metadata) == {
            "instance_id": big.instance_id,
            "implementation": big.implementation,
        }
        assert report.timestamp_ns + batch.base_timestamp_ns >= before - 10**10


def test_batches_can_be_left_out(stream: telemetry.AnyTelemetryStream) -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    telemetry.add_to_server(srv, stream, batches=False)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    address = f"127.0.0.1:{port}"
    batched = BatchClient(address)
    single = Client(address)
    try:
        assert batched.done.wait(5)
        assert batched.error is not None
        assert batched.error.code() == grpc.StatusCode.UNIMPLEMENTED
        telemetry.emit("still.served", {"x": 1})
        assert [list(e.event_parts) for e in single.take(1)] == [["still", "served"]]
        assert stream.stats()["batches_sent"] == 0
    finally:
        batched.close()
        single.close()
        stream.close()
        srv.stop(0).wait(2)


def test_batched_takeover(
    big: telemetry.AnyTelemetryStream, serve: Serve, clients: Callable[[str], BatchClient]
) -> None:
    """A second call supersedes the first mid-flow; nothing lost or sent twice."""
    n = 20_000
    address = serve(big)
    old = clients(address)
    assert wait_until(lambda: big.stats()["active_stream"])

    def produce() -> None:
        for i in range(n):
            if i == n // 2:
                # The second half only once the new call is open, so that both
                # calls get events however slowly the takeover goes on a busy
                # machine (the first half is still in flight during it).
                wait_until(lambda: big.stats()["streams_opened"] == 2, timeout=10)
            telemetry.emit("take.evt", {"seq": i})
            if i % 200 == 199:
                time.sleep(0.002)  # spread the emits over the takeover

    producer = threading.Thread(target=produce)
    producer.start()
    assert wait_until(lambda: old.events.qsize() >= 1000)
    new = clients(address)
    assert wait_until(lambda: big.stats()["streams_opened"] == 2)
    assert old.done.wait(3), "the superseded call did not end"
    assert old.error is None  # ended normally, not cancelled
    producer.join()

    got_old: list[int] = []
    got_new: list[int] = []

    def settled() -> bool:
        got_old.extend(seqs(old.take_all()))
        got_new.extend(seqs(new.take_all()))
        s = big.stats()
        return len(got_old) + len(got_new) + s["interrupted_sends"] + drops(s) >= n

    assert wait_until(settled, timeout=10)
    stats = big.stats()
    assert stats["emitted"] == n
    assert stats["emitted"] == stats["sent"] + stats["interrupted_sends"] + drops(stats)
    received = got_old + got_new
    assert got_old and got_new
    # The old call got a prefix and the new one the rest, in order, no duplicates.
    assert received == sorted(received) and len(set(received)) == len(received)
    missing = set(range(n)) - set(received)
    assert len(missing) <= stats["interrupted_sends"] + drops(stats)
    assert stats["sent"] <= len(received) <= stats["sent"] + stats["interrupted_sends"]
    if not stats["interrupted_sends"]:
        assert received == list(range(n))


@pytest.mark.parametrize("batched", [True, False], ids=["batches", "single"])
def test_wakeup_without_safety_net(
    monkeypatch: pytest.MonkeyPatch, serve: Serve, batched: bool
) -> None:
    """An emit into an idle stream reaches the client well before the 0.5 s re-check."""
    monkeypatch.setenv(stream_module.STATS_INTERVAL_ENV, "0")  # no stats wake-ups
    s = telemetry.new_stream(queue_size=1024)
    telemetry.set_stream(s)
    address = serve(s)
    client: BatchClient | Client = BatchClient(address) if batched else Client(address)
    rng = random.Random(5)
    try:
        assert wait_until(lambda: s.stats()["active_stream"])
        for i in range(20):
            assert wait_until(lambda: idle(s))  # the stream thread is asleep
            time.sleep(rng.uniform(0.0, 0.03))
            started = time.monotonic()
            # Every place that queues an event must wake the thread.
            if i % 4 == 0:
                telemetry.emit("wake.evt", {"i": i})  # core's inlined fast path
                want = 1
            elif i % 4 == 1:
                s.emit_event("wake.evt", {"i": i})  # the stream's fast path
                want = 1
            elif i % 4 == 2:
                s.emit_event(["wake", "evt"], {"i": i})  # the full path
                want = 1
            else:
                with telemetry.span("wake.span"):  # span fast path
                    pass
                want = 2
            client.take(want, timeout=1.0)
            elapsed = time.monotonic() - started
            assert elapsed < 0.25, f"round {i}: {elapsed:.3f}s, the wake-up was missed"
    finally:
        client.close()


# ------------------------------------------------------------ lock-free emits


def test_fast_path_counters_under_threads() -> None:
    threads, per_thread, size = 4, 20_000, 1000
    s = telemetry.new_stream(queue_size=size)
    telemetry.set_stream(s)
    start = threading.Barrier(threads)

    def work(t: int) -> None:
        # Half the threads through telemetry.emit, half through the stream.
        emit = telemetry.emit if t % 2 else s.emit_event
        start.wait()
        for i in range(per_thread):
            emit("fast.evt", {"seq": i}, {"t": str(t)})

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert fast_path(s)
    stats = s.stats()
    total = threads * per_thread
    assert stats["emitted"] == total == stats["enqueued"] + stats["dropped_queue_full"]
    assert drops(stats) == stats["dropped_queue_full"] and stats["internal_errors"] == 0
    assert size <= stats["queue_len"] <= size + threads
    assert stats["enqueued"] == stats["queue_len"]  # no call took any

    events = s.drain_queued()
    assert len(events) == stats["queue_len"]
    per: dict[str, list[int]] = {}
    for e in events:
        per.setdefault(e.metadata["t"], []).append(int(e.measurements["seq"]))
    assert all(v == sorted(v) and len(set(v)) == len(v) for v in per.values())  # FIFO
    after = s.stats()
    assert after["queue_len"] == 0 and after["emitted"] == total
    assert after["enqueued"] == stats["enqueued"]  # drained events stay counted
    s.close()


def test_controls_take_the_full_path(stream: telemetry.AnyTelemetryStream) -> None:
    resolve_fast(stream)
    size = stream.queue_size

    def fast_cap_is(expected: int) -> bool:
        # The pure stream's lock-free path is on only while no decision is needed
        # (the native stream decides in Rust on every emit: nothing to check).
        return NATIVE or stream._fast_cap == expected  # type: ignore[union-attr]

    assert fast_cap_is(size)
    assert stream.apply_control(toggle(False)) and fast_cap_is(0)
    telemetry.emit("a.b", {"x": 1})
    assert stream.apply_control(toggle(True)) and fast_cap_is(size)
    assert stream.apply_control(sampling(0.0, "s.*")) and fast_cap_is(0)
    telemetry.emit("s.x", {"x": 1})
    telemetry.emit("t.x", {"x": 1})
    with telemetry.span("s.span"):  # sampled out whole
        pass
    assert stream.apply_control(sampling(1.0, "s.*")) and fast_cap_is(size)
    assert stream.apply_control(filt(deny=("d.*",))) and fast_cap_is(0)
    telemetry.emit("d.x", {"x": 1})
    telemetry.emit("ok.x", {"x": 1})
    telemetry.emit("bad..name", {"x": 1})
    stats = stream.stats()
    assert stats["dropped_disabled"] == 1
    assert stats["dropped_sampled"] == 3  # s.x, s.span.start, s.span.stop
    assert stats["dropped_filtered"] == 1 and stats["dropped_invalid"] == 1
    assert stats["emitted"] == 8 == stats["enqueued"] + drops(stats)
    assert [".".join(e.parts) for e in stream.drain_queued()] == ["t.x", "ok.x"]


def test_span_fast_path(stream: telemetry.AnyTelemetryStream) -> None:
    resolve_fast(stream)
    with telemetry.correlation.correlation("req-1"):
        try:
            with telemetry.span("tool.execution", {"tool": "x"}) as sp:
                assert sp._backend is FAST_SPAN
                raise ValueError("bad input")
        except ValueError:
            pass
        ok = telemetry.span("python.call", {"m": "predict"}).__enter__()
        assert ok._backend is FAST_SPAN
        ok.stop({"rows": 3})
    start, exc, ok_start, ok_stop = stream.drain_queued()
    assert start.parts == ("tool", "execution", "start")
    assert exc.parts == ("tool", "execution", "exception")
    assert start.correlation_id == exc.correlation_id == "req-1"
    assert start.metadata == {"tool": "x"} and type(start.measurements["system_time"]) is int
    assert exc.metadata == {"tool": "x", "error_type": "ValueError", "error_message": "bad input"}
    assert exc.measurements["duration"] >= 0
    assert ok_stop.parts == ("python", "call", "stop")
    assert ok_start.correlation_id == ok_stop.correlation_id == "req-1"
    assert ok_stop.metadata == {"m": "predict", "rows": "3"}


def test_span_sampling_switched_on_midway(stream: telemetry.AnyTelemetryStream) -> None:
    resolve_fast(stream)
    sp = telemetry.span("python.call", correlation_id="c1")
    sp.__enter__()
    assert sp._backend is FAST_SPAN
    assert stream.apply_control(sampling(0.0))  # everything sampled out from now on
    sp.__exit__(None, None, None)  # decided at enter: the stop is still delivered
    with telemetry.span("python.call"):  # started under sampling: dropped whole
        pass
    stats = stream.stats()
    assert stats["dropped_sampled"] == 2
    events = stream.drain_queued()
    assert [e.parts[-1] for e in events] == ["start", "stop"]
    assert {e.correlation_id for e in events} == {"c1"}


def test_both_rpcs_deliver_the_same(serve: Serve) -> None:
    """Odd values over either RPC: same events received, same counters."""
    raw = [e for _, case in EDGE_CASES for e in case]
    seen = []
    for batched in (True, False):
        s = telemetry.new_stream(queue_size=1024)
        address = serve(s)
        client: BatchClient | Client = BatchClient(address) if batched else Client(address)
        try:
            assert wait_until(lambda s=s: s.stats()["active_stream"])
            for parts, measurements, metadata, correlation_id, _, span_id, stack in raw:
                s.emit_event(parts, measurements, metadata, correlation_id, None, span_id, stack)
            assert s.wait_drained(5)
            stats = s.stats()
            got = [normal(e)[:4] for e in client.take(int(stats["sent"]))]
        finally:
            client.close()
        keys = ("emitted", "sent", "measurements_dropped", "internal_errors")
        counters = {k: stats[k] for k in keys}
        seen.append((got, counters))
    assert seen[0] == seen[1]
    assert seen[0][1]["internal_errors"] > 0 and seen[0][1]["measurements_dropped"] > 0


def served_with_flush_interval(
    monkeypatch: pytest.MonkeyPatch, serve: Serve, interval_ms: int
) -> tuple[telemetry.AnyTelemetryStream, BatchClient]:
    """The default stream, with this flush interval and no stats reports, read
    by a batch client."""
    monkeypatch.setenv(stream_module.STATS_INTERVAL_ENV, "0")
    monkeypatch.setenv(stream_module.FLUSH_INTERVAL_ENV, str(interval_ms))
    s = telemetry.new_stream(queue_size=4096)
    telemetry.set_stream(s)
    return s, BatchClient(serve(s))


def test_a_full_batch_goes_before_the_flush_time(
    monkeypatch: pytest.MonkeyPatch, serve: Serve
) -> None:
    """The emit that fills a batch (FLUSH_EVENTS events) wakes the sender that
    waits for the flush time: with a 10-minute interval, only that wake gets
    the events out within the test's timeout."""
    s, client = served_with_flush_interval(monkeypatch, serve, 600_000)
    try:
        assert wait_until(lambda: idle(s), timeout=10)
        telemetry.emit("full.first", {"i": -1})
        client.take(1, timeout=10.0)  # after a quiet spell: at once
        n = stream_module.FLUSH_EVENTS
        # One event: the sender now waits for the flush time, 10 minutes away
        # (given a moment to get there; if it has not, it finds the batch full).
        telemetry.emit("full.many", {"i": 0})
        time.sleep(0.2)
        for i in range(1, n):
            telemetry.emit("full.many", {"i": i})
        got = client.take(n, timeout=30.0)
        assert [e.measurements["i"].int_value for e in got] == list(range(n))
    finally:
        client.close()


def test_flush_interval(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    """After a batch, small batches wait out the interval; a quiet start does not."""
    s, client = served_with_flush_interval(monkeypatch, serve, 400)
    try:
        assert wait_until(lambda: idle(s))
        started = time.monotonic()
        telemetry.emit("flush.first", {"i": 0})
        client.take(1, timeout=1.0)
        assert time.monotonic() - started < 0.3  # nothing was sent recently: at once

        telemetry.emit("flush.second", {"i": 1})
        client.take(1, timeout=2.0)
        waited = time.monotonic() - started
        assert waited >= 0.3, f"the second batch went out after {waited:.3f}s"

        # A burst rides in few messages (at most one per interval, plus any that
        # the stream thread found already full).
        for i in range(stream_module.FLUSH_EVENTS + 10):
            telemetry.emit("flush.many", {"i": i})
        client.take(stream_module.FLUSH_EVENTS + 10, timeout=2.0)
        assert len(client.batches) <= 5
    finally:
        client.close()
