"""The extension module ``snakepit_telemetry._native`` itself (its API as the
package uses it; ``test_conformance`` checks its conversion case by case against
``wire.BatchEncoder``, and the rest of the suite its behaviour as the default
stream).

Runs on the native run only. Every test restores the module's global state
(default stream, configuration) as the package set it.
"""

from __future__ import annotations

import contextvars
import enum
import fractions
import gc
import numbers
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import grpc
import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry.telemetry._internal import wire
from snakepit_telemetry.telemetry._internal.control import ControlState
from snakepit_telemetry.telemetry.native_stream import NativeTelemetryStream
from snakepit_telemetry.telemetry.stream import STATS_MEASUREMENTS

from .conftest import NATIVE, BatchClient, Client, wait_until

pytestmark = pytest.mark.native_only

if NATIVE:
    from snakepit_telemetry import _native
else:  # collected but skipped on the python run
    _native = None  # type: ignore[assignment]

STATS_PARTS = ["telemetry", "python", "stats"]


def new_stream(**overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "queue_size": 256,
        "flush_interval_ms": 0,
        "stats_interval_ms": 0,
        "max_message_bytes": 4 << 20,
        "enabled": True,
        "default_rate": 1.0,
        "allow": [],
        "deny": [],
        "secret": None,
    }
    settings.update(overrides)
    return _native.Stream(**settings)


def drained(stream: Any) -> list[pb.TelemetryEvent]:
    return [pb.TelemetryEvent.FromString(m) for m in stream.drain_queued()]


def view(event: pb.TelemetryEvent) -> tuple[Any, ...]:
    values = {}
    for key, value in event.measurements.items():
        which = value.WhichOneof("value")
        values[key] = (which, getattr(value, which))
    return (
        tuple(event.event_parts),
        values,
        dict(event.metadata),
        event.correlation_id,
        event.span_id,
        [(f.file, f.line, f.function) for f in event.stacktrace],
    )


def reference(raw: wire.RawEvent) -> tuple[list[tuple[Any, ...]], int, int]:
    """What the pure batch encoder makes of one raw event (events, dropped, errors)."""
    payload, consumed, _, dropped, errors, _ = wire.BatchEncoder().encode([raw], 1 << 24)
    assert consumed == 1
    return [view(e) for e in pb.TelemetryEventBatch.FromString(payload).events], dropped, errors


@pytest.fixture
def module_state() -> Iterator[contextvars.ContextVar[str | None]]:
    """A private correlation variable and fallback for the test; the package's
    default stream and configuration are put back afterwards."""
    saved_default = _native.default_stream()
    saved_config = _native.configuration()
    var: contextvars.ContextVar[str | None] = contextvars.ContextVar("test_cid", default=None)
    yield var
    _native.set_default(saved_default)
    if saved_config is not None:
        _native.configure(*saved_config)


# ------------------------------------------------------------------ conversion


class Level(enum.IntEnum):
    LOW = 1


class Color(str, enum.Enum):  # noqa: UP042 - str() differs from a StrEnum's
    RED = "red"


class Tag(str):
    def __str__(self) -> str:
        return "tag-str"


class Meters:
    """A numbers.Real registered by hand, as numpy's float types are."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __float__(self) -> float:
        return self.value


numbers.Real.register(Meters)


class Boom:
    def __str__(self) -> str:
        raise RuntimeError("no str")


class BadFloat(Meters):
    def __float__(self) -> float:
        raise ValueError("no float")


class OddMapping(Mapping[Any, Any]):
    def __init__(self, items: dict[Any, Any]) -> None:
        self._items = items

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


class ItemsRaise(OddMapping):
    def items(self) -> Any:
        raise RuntimeError("items")


TRICKY: list[tuple[str, wire.RawEvent]] = [
    ("bool", (("a", "b"), {"t": True, "f": False}, None, None, 0, 0, ())),
    (
        "big ints",
        (("a", "b"), {"big": 2**63, "neg": -(2**63) - 1, "ok": 2**63 - 1}, None, None, 0, 0, ()),
    ),
    ("IntEnum", (("a", "b"), {"lvl": Level.LOW}, {"lvl": Level.LOW}, None, 0, 0, ())),
    ("str Enum", (("a", "b"), {"c": Color.RED}, {"c": Color.RED, Color.RED: "k"}, None, 0, 0, ())),
    (
        "str subclass keys",
        (("a", "b"), {Tag("k"): 1, "v": Tag("x")}, {Tag("k"): Tag("v")}, None, 0, 0, ()),
    ),
    (
        "numbers.Real class",
        (("a", "b"), {"m": Meters(2.5), "f": fractions.Fraction(1, 4)}, None, None, 0, 0, ()),
    ),
    ("float() raises", (("a", "b"), {"m": BadFloat(1.0)}, None, None, 0, 0, ())),
    ("non-mapping measurements", (("a", "b"), [1, 2], None, None, 0, 0, ())),
    ("falsy non-mapping", (("a", "b"), 0, {"k": "v"}, None, 0, 0, ())),
    ("non-mapping metadata", (("a", "b"), {"x": 1}, ["k"], None, 0, 0, ())),
    (
        "metadata str() raises",
        (("a", "b"), {"x": 1}, {"bad": Boom(), Boom(): "v", "ok": 1}, None, 0, 0, ()),
    ),
    ("None values", (("a", "b"), {"x": None}, {"gone": None, "kept": 0}, None, 0, 0, ())),
    (
        "odd values",
        (("a", "b"), {"l": [1], "n": None, "d": {}}, {"l": [1], "d": {"a": 1}}, None, 0, 0, ()),
    ),
    ("Mapping class", (("a", "b"), OddMapping({"x": 1, 2: 3}), OddMapping({1: 2}), None, 0, 0, ())),
    ("items() raises", (("a", "b"), ItemsRaise({"x": 1}), None, None, 0, 0, ())),
    ("correlation id not a str", (("a", "b"), {}, None, 0, 0, 0, ())),
    ("correlation id str() raises", (("a", "b"), {}, None, Boom(), 0, 0, ())),
    (
        "span and frames",
        (("a", "b"), {}, None, "c", 0, 2**64 - 1, (("f.py", 3, "fn"), ("", 2**40, ""))),
    ),
    ("bad frame", (("a", "b"), {}, None, None, 0, 5, (("f.py", "x", "fn"),))),
]


@pytest.mark.parametrize("raw", [c[1] for c in TRICKY], ids=[c[0] for c in TRICKY])
def test_conversion_matches_the_pure_encoder(raw: wire.RawEvent) -> None:
    s = new_stream()
    parts, measurements, metadata, correlation_id, _, span_id, stack = raw
    s.emit_event(parts, measurements, metadata, correlation_id, None, span_id, stack)
    got = [view(e) for e in drained(s)]
    stats = s.stats()
    want, dropped, errors = reference(raw)
    assert (got, stats["measurements_dropped"], stats["internal_errors"]) == (want, dropped, errors)
    assert stats["emitted"] == 1


def test_a_dict_changed_by_a_conversion_fails_the_event_not_the_process() -> None:
    measurements: dict[str, Any] = {}

    class Grows(Meters):
        def __float__(self) -> float:
            for i in range(50):
                measurements[f"k{i}"] = i
            return 1.0

    measurements["a"] = Grows(1.0)
    s = new_stream()
    s.emit_event("a.b", measurements)
    assert drained(s) == []
    assert s.stats()["internal_errors"] == 1 and s.stats()["emitted"] == 1


def test_emitting_from_inside_a_conversion_works(module_state: Any) -> None:
    s = new_stream()

    class Nested:
        def __str__(self) -> str:
            s.emit_event("inner.evt", {"x": 1})
            return "outer-value"

    s.emit_event("outer.evt", {"y": 2}, {"k": Nested()})
    events = {".".join(e.event_parts): e for e in drained(s)}
    assert set(events) == {"inner.evt", "outer.evt"}
    assert events["outer.evt"].metadata["k"] == "outer-value"


def test_event_names() -> None:
    s = new_stream()
    for good in ["a.b", ("a", "b"), ["a", "b"], Tag("a.b"), "single"]:
        s.emit_event(good, {"x": 1})
    for bad in ["", "a..b", ".a", "a.", (), ("a", ""), ("a", Tag("b")), ("a", 1), 5, None, b"a.b"]:
        s.emit_event(bad, {"x": 1})
    names = [".".join(e.event_parts) for e in drained(s)]
    assert names == ["a.b", "a.b", "a.b", "a.b", "single"]
    assert s.stats()["dropped_invalid"] == 11


def test_the_name_cache_stays_right_past_its_size() -> None:
    s = new_stream(queue_size=8192)
    names = [f"n{i}.evt" for i in range(3000)]
    for round_ in range(2):
        for name in names:
            # A fresh str object each time, equal to a cached one.
            s.emit_event("".join(name), {"r": round_})
    got = [".".join(e.event_parts) for e in drained(s)]
    assert got == names + names


# --------------------------------------------------------------- module emit


def test_emit_takes_the_correlation_id_from_the_context(module_state: Any) -> None:
    var = module_state
    fallback_calls: list[tuple[Any, ...]] = []
    _native.configure(var, lambda *args: fallback_calls.append(args))
    s = new_stream()
    _native.set_default(s)
    _native.emit("a.b", {"x": 1})
    token = var.set("ctx-id")
    try:
        _native.emit("a.b", {"x": 2})
        _native.emit("a.b", {"x": 3}, None, "explicit")
        _native.emit("a.b", measurements={"x": 4}, correlation_id=7)
    finally:
        var.reset(token)
    events = drained(s)
    assert [e.correlation_id for e in events] == ["", "ctx-id", "explicit", "7"]
    assert fallback_calls == []


def test_emit_hands_other_events_to_the_fallback(module_state: Any) -> None:
    var = module_state
    calls: list[tuple[Any, ...]] = []
    _native.configure(var, lambda *args: calls.append(args))
    s = new_stream()
    _native.set_default(None)
    _native.emit("a.b", {"x": 1})
    _native.set_default(s)
    _native.emit(("a", "b"), {"x": 2}, {"k": "v"})
    _native.emit(Tag("a.b"), None, correlation_id="c")
    assert calls == [
        ("a.b", {"x": 1}, None, None),
        (("a", "b"), {"x": 2}, {"k": "v"}, None),
        (Tag("a.b"), None, None, "c"),
    ]
    assert drained(s) == []


def test_emit_never_raises_but_for_its_signature(module_state: Any) -> None:
    var = module_state

    def failing(*args: Any) -> None:
        raise RuntimeError("fallback failed")

    _native.configure(var, failing)
    before = _native.process_errors()
    _native.set_default(None)
    _native.emit(("a", "b"), {})  # the fallback raises: counted
    assert _native.process_errors() == before + 1
    s = new_stream()
    _native.set_default(s)
    _native.emit("a.b", {"m": Boom()}, {"k": Boom()}, Boom())
    assert s.stats()["internal_errors"] == 1
    with pytest.raises(TypeError):
        _native.emit("a.b")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _native.emit("a.b", {}, None, None, "extra")  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _native.emit("a.b", {}, bogus=1)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        _native.emit("a.b", {}, measurements={})  # type: ignore[call-arg]


def test_emit_keeps_the_replaced_default_alive(module_state: Any) -> None:
    """set_default run by Python code inside a conversion cannot free the
    stream the running emit writes to."""
    var = module_state
    _native.configure(var, lambda *args: None)
    s = new_stream()
    _native.set_default(s)
    received = []

    class Swap:
        def __str__(self) -> str:
            _native.set_default(None)
            gc.collect()
            return "v"

    keep = s.drain_queued  # the test keeps a way to read it without a name for s
    del s
    _native.emit("a.b", {"x": 1}, {"k": Swap()})
    received = [pb.TelemetryEvent.FromString(m) for m in keep()]
    assert [dict(e.metadata) for e in received] == [{"k": "v"}]


# ---------------------------------------------------------- stream interface


def test_stats_have_the_pure_streams_keys() -> None:
    from snakepit_telemetry.telemetry.stream import TelemetryStream

    pure = set(TelemetryStream(queue_size=4, secret=None).stats())
    assert set(new_stream().stats()) == pure - {"process_internal_errors"}


def test_controls_and_control_state() -> None:
    s = new_stream(enabled=True, default_rate=0.5, allow=["a.*"], deny=["a.secret"])
    want = ControlState(default_rate=0.5, allow=("a.*",), deny=("a.secret",))
    assert s.control_state() == want.to_dict()
    rules = [
        pb.TelemetryControl(
            sampling=pb.TelemetrySamplingUpdate(sampling_rate=0.25, event_patterns=[f"p{i}.*"])
        )
        for i in range(34)
    ]
    for control in rules:
        assert s.apply_control(control.SerializeToString())
        want, _ = want.apply(control)  # type: ignore[misc]
    assert s.control_state() == want.to_dict()
    assert s.stats()["controls_truncated"] == 2
    assert s.sample_rate("p33.x") == 0.25 and s.sample_rate("zz") == 0.5
    assert not s.apply_control(b"\xff\xff")
    assert not s.apply_control(b"")
    assert not s.apply_control("not bytes")
    assert s.stats()["internal_errors"] == 3
    s.emit_event("b.x", {})
    s.emit_event("a.secret", {})
    stats = s.stats()
    assert stats["dropped_filtered"] == 2
    off = pb.TelemetryControl(toggle=pb.TelemetryToggle(enabled=False))
    assert s.apply_control(off.SerializeToString())
    s.emit_event("a.b", {})
    assert s.stats()["dropped_disabled"] == 1 and s.stats()["enabled"] is False
    # A span's decision taken earlier wins over sampling.
    on = pb.TelemetryControl(toggle=pb.TelemetryToggle(enabled=True))
    s.apply_control(on.SerializeToString())
    s.emit_event("a.b", {}, sampled=True)
    s.emit_event("a.b", {}, sampled=False)
    assert len(drained(s)) == 1 and s.stats()["dropped_sampled"] == 1


def test_count_names_the_pure_streams_counters() -> None:
    s = new_stream()
    s.count("refused_calls")
    s.count("internal_errors", 3)
    assert s.stats()["refused_calls"] == 1 and s.stats()["internal_errors"] == 3
    with pytest.raises(KeyError):
        s.count("no_such_counter")


def next_message(call: Any, timeout: float = 10.0) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = call.next(0.5)
        if message is not None:
            return message
    pytest.fail("no message in time")


def test_a_call_pulls_messages_and_hands_back_on_takeover() -> None:
    saved = _native.process_errors()
    _native.reset_process_errors()
    _native.count_process_errors(5)
    s = new_stream(stats_interval_ms=60_000)
    try:
        for i in range(3):
            s.emit_event("a.b", {"i": i})
        old = s.open_call(False)
        stats_event = pb.TelemetryEvent.FromString(next_message(old))
        assert list(stats_event.event_parts) == STATS_PARTS
        assert set(stats_event.measurements) == set(STATS_MEASUREMENTS)
        assert stats_event.measurements["internal_errors"].int_value == 5  # process-wide
        assert dict(stats_event.metadata) == {
            "instance_id": s.instance_id,
            "implementation": "native",
        }
        first = pb.TelemetryEvent.FromString(next_message(old))
        assert first.measurements["i"].int_value == 0
        # In a send when a new call takes over: the old call ends there.
        new = s.open_call(True)
        assert new.generation == old.generation + 1
        old.finish()
        with pytest.raises(StopIteration):
            old.next(0.1)
        stats = s.stats()
        assert stats["interrupted_sends"] == 1 and stats["queue_len"] == 2
        batch = pb.TelemetryEventBatch.FromString(next_message(new))
        if [list(e.event_parts) for e in batch.events] == [STATS_PARTS]:
            batch = pb.TelemetryEventBatch.FromString(next_message(new))
        assert [e.measurements["i"].int_value for e in batch.events] == [1, 2]
        new.sent()
        assert s.wait_drained(5)
        assert s.stats()["sent"] == 2 and s.stats()["batches_sent"] == 1
        s.close()
        with pytest.raises(StopIteration):
            new.next(5)
        assert not s.stats()["active_stream"]
    finally:
        _native.reset_process_errors()
        _native.count_process_errors(saved)


def test_a_dropped_call_finishes_itself() -> None:
    s = new_stream()
    s.emit_event("a.b", {"x": 1})
    call = s.open_call(False)
    next_message(call)  # the event, in a send
    assert s.stats()["in_flight"] == 1
    del call
    gc.collect()
    stats = s.stats()
    assert stats["in_flight"] == 0 and stats["interrupted_sends"] == 1
    assert not stats["active_stream"]


def test_next_waits_without_the_gil_and_an_emit_wakes_it() -> None:
    s = new_stream()
    call = s.open_call(True)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(call.next(30)))
    reader.start()
    deadline = time.monotonic() + 10
    while not s.idle:
        assert time.monotonic() < deadline, "the reader never waited"
        time.sleep(0.001)  # the reader waits with the GIL released: this thread runs
    started = time.monotonic()
    s.emit_event("a.b", {"x": 1})
    reader.join(20)
    assert not reader.is_alive() and time.monotonic() - started < 20
    batch = pb.TelemetryEventBatch.FromString(got[0])
    assert [list(e.event_parts) for e in batch.events] == [["a", "b"]]
    call.finish()


def test_many_threads_emit_while_a_call_drains() -> None:
    s = new_stream(queue_size=1 << 16)
    call = s.open_call(True)
    per_thread, threads = 5000, 4
    received = 0
    done = threading.Event()

    def drain() -> None:
        nonlocal received
        while not done.is_set() or s.stats()["queue_len"]:
            message = call.next(0.05)
            if message is None:
                continue
            batch = pb.TelemetryEventBatch.FromString(message)
            received += sum(1 for e in batch.events if list(e.event_parts) != STATS_PARTS)
            call.sent()

    reader = threading.Thread(target=drain)
    reader.start()
    workers = [
        threading.Thread(target=lambda: [s.emit_event("a.b", {"i": i}) for i in range(per_thread)])
        for _ in range(threads)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert s.wait_drained(30)
    done.set()
    reader.join(30)
    stats = s.stats()
    assert stats["emitted"] == per_thread * threads
    assert received == stats["sent"] == per_thread * threads - stats["dropped_queue_full"]
    call.finish()


# --------------------------------------------------------------- the server


def test_serve_replace_and_stop(tmp_path: Any) -> None:
    s = new_stream(secret=b"s3cret-value")
    try:
        assert s.serving is None
        first = s.serve("127.0.0.1:0")
        assert s.serving == first and first.startswith("127.0.0.1:")
        path = tmp_path / "t.sock"
        second = s.serve(f"unix://{path}")
        assert second == f"unix:{path}" and s.serving == second and path.exists()
        # The first server is gone.
        channel = grpc.insecure_channel(first)
        try:
            with pytest.raises(grpc.FutureTimeoutError):
                grpc.channel_ready_future(channel).result(timeout=0.5)
        finally:
            channel.close()
        client = Client(second, secret="s3cret-value")
        try:
            s.emit_event("served.evt", {"x": 1})
            (event,) = client.take(1, timeout=10)
            assert list(event.event_parts) == ["served", "evt"]
        finally:
            client.close()
        s.stop_serving()
        assert s.serving is None and not path.exists()
        with pytest.raises(ValueError):
            s.serve("not-an-address")
        with pytest.raises(OSError):
            s.serve(f"unix:{tmp_path}/missing/dir/t.sock")
    finally:
        s.stop_serving()


def test_a_steady_emitter_sends_due_batches_itself(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a flush interval, an emit that finds a batch due sends it on the
    emitting thread (no thread woken); server_rounds() shows it, and every
    event arrives in order."""
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS", "10")
    s = NativeTelemetryStream(queue_size=4096, secret=None)
    client = None
    try:
        assert s.server_rounds() is None
        address = s.serve(f"unix:{tmp_path / 't.sock'}")
        client = BatchClient(address)
        assert wait_until(lambda: s.stats()["active_stream"], timeout=10)
        total = 300
        for i in range(total):
            s.emit_event("steady.evt", {"seq": i})
            time.sleep(0.0005)
        got = client.take(total, timeout=30)
        assert [e.measurements["seq"].int_value for e in got] == list(range(total))
        rounds = s.server_rounds()
        assert rounds is not None
        assert rounds["by_emitters"] > 0, rounds
        assert rounds["emitter_ns"] > 0, rounds
        assert s.stats()["internal_errors"] == 0
    finally:
        if client is not None:
            client.close()
        s.stop_serving()
    assert s.server_rounds() is None


def test_after_fork_in_child_starts_a_new_instance() -> None:
    s = new_stream()
    s.emit_event("a.b", {"x": 1})
    s.count("internal_errors")
    old_id = s.instance_id
    s.after_fork_in_child()  # as the child's at-fork hook calls it
    assert s.instance_id != old_id
    stats = s.stats()
    assert stats["emitted"] == 0 and stats["internal_errors"] == 0 and stats["queue_len"] == 0
    s.emit_event("c.d", {"x": 2})
    assert [list(e.event_parts) for e in drained(s)] == [["c", "d"]]
