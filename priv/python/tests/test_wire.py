"""BatchEncoder against the reference conversion (convert + the protobuf runtime).

Every output is parsed with the generated ``TelemetryEventBatch`` and compared,
event by event, with ``convert.to_proto`` of the same raw event converted by
``convert.measurements``/``convert.metadata`` (the rules the single-event RPC
uses), including the drop and error counts.
"""

from __future__ import annotations

import enum
import fractions
import math
import random
import types
from collections.abc import Iterator, Mapping
from typing import Any

import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry.telemetry._internal import convert, wire

pytestmark = pytest.mark.python_only(
    "wire.BatchEncoder, the pure stream's batch encoder, against the reference conversion "
    "(test_conformance.py checks the native conversion against the same cases)"
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# Values whose varint takes every length from 1 to 10 bytes, at the boundaries.
VARINT_EDGES = [
    *(0, 1, 127, 128, 16383, 16384, 2**21, 2**28 - 1, 2**28),
    *(2**35, 2**42, 2**49, 2**56 - 1, 2**56, 2**63 - 1, -1),
]
BASE = 1_700_000_000_000_000_000


# ----------------------------------------------------------------- reference


class Ref:
    """The reference result of one raw event: message (or None) and counts."""

    def __init__(self, raw: wire.RawEvent) -> None:
        self.message: pb.TelemetryEvent | None = None
        # The single-event RPC's path (TelemetryStream._convert, then _build).
        converted, self.dropped, self.errors = convert.from_raw(raw)
        if converted is None:
            return
        try:
            self.message = convert.to_proto(converted)
        except Exception:
            self.errors += 1


def value_key(value: pb.TelemetryValue) -> tuple[Any, ...]:
    """A comparable form of a TelemetryValue: NaN equals NaN, -0.0 differs from 0.0."""
    which = value.WhichOneof("value")
    if which == "float_value":
        f = value.float_value
        return ("float", "nan") if math.isnan(f) else ("float", f, math.copysign(1.0, f))
    if which == "int_value":
        return ("int", value.int_value)
    return (which, value.string_value)


def normal(event: pb.TelemetryEvent, base: int = 0) -> tuple[Any, ...]:
    """Everything the receiver sees of one event, with its absolute timestamp."""
    return (
        tuple(event.event_parts),
        {k: value_key(v) for k, v in event.measurements.items()},
        dict(event.metadata),
        event.correlation_id,
        base + event.timestamp_ns,
    )


def decode(payload: bytes) -> list[tuple[Any, ...]]:
    batch = pb.TelemetryEventBatch.FromString(payload)
    return [normal(e, batch.base_timestamp_ns) for e in batch.events]


def check(
    encoder: wire.BatchEncoder, events: list[wire.RawEvent], **kw: Any
) -> tuple[bytes, int, int, int, int, int]:
    """Encode all of ``events`` and compare with the reference, counts included."""
    result = encoder.encode(events, **kw)
    payload, consumed, encoded, dropped, errors, oversized = result
    assert consumed == len(events) and oversized == 0
    refs = [Ref(raw) for raw in events]
    want = [normal(r.message) for r in refs if r.message is not None]
    assert decode(payload) == want
    assert encoded == len(want)
    assert dropped == sum(r.dropped for r in refs)
    assert errors == sum(r.errors for r in refs)
    return result


def check_twice(events: list[wire.RawEvent]) -> None:
    """Cold caches (general path) and then warm caches (mostly the fast path)."""
    encoder = wire.BatchEncoder()
    first = check(encoder, events)
    assert check(encoder, events) == first


# ------------------------------------------------------------- odd values


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2**40


class Mode(str, enum.Enum):  # noqa: UP042 - a StrEnum would str() to its value
    """Equal to (and hashing like) "fast", but str() gives "Mode.fast"."""

    fast = "fast"


class Tag(str):
    """A str subclass with its own str(): equal to the plain text, stringifies apart."""

    def __str__(self) -> str:
        return "tag:" + str.__str__(self)


class Plain(str):
    """A str subclass that behaves like its text everywhere."""


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no str")


class Ambiguous:
    """Like a numpy array: truth value undefined."""

    def __bool__(self) -> bool:
        raise ValueError("ambiguous")

    def __str__(self) -> str:
        return "ambiguous"


class Frozen(Mapping[Any, Any]):
    """A read-only Mapping that is not a dict."""

    def __init__(self, data: dict[Any, Any]) -> None:
        self._data = data

    def __getitem__(self, key: Any) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)


def ev(
    measurements: Any = None,
    metadata: Any = None,
    correlation_id: Any = None,
    timestamp_ns: int = BASE,
    parts: tuple[str, ...] = ("python", "call", "stop"),
    span_id: int = 0,
    stack: tuple[tuple[str, int, str], ...] = (),
) -> wire.RawEvent:
    return (parts, measurements, metadata, correlation_id, timestamp_ns, span_id, stack)


# --------------------------------------------------------------- hand-picked

EDGE_CASES: list[tuple[str, list[wire.RawEvent]]] = [
    ("plain", [ev({"duration": 5, "ratio": 0.5}, {"command": "predict"}, "cid-1")]),
    ("bool and IntEnum", [ev({"t": True, "f": False, "lo": Level.LOW, "hi": Level.HIGH})]),
    ("int64 bounds", [ev({"min": INT64_MIN, "max": INT64_MAX, "neg": -5, "m1": -1})]),
    ("out of int64", [ev({"over": 2**63, "under": INT64_MIN - 1, "huge": 10**30, "ok": 1})]),
    ("IntEnum out of int64", [ev({"x": enum.IntEnum("Big", {"V": 2**64}).V})]),
    ("varint sizes", [ev({f"v{i}": v for i, v in enumerate(VARINT_EDGES)})]),
    (
        "floats",
        [
            ev(
                {
                    "nan": math.nan,
                    "inf": math.inf,
                    "ninf": -math.inf,
                    "negzero": -0.0,
                    "zero": 0.0,
                    "huge": 1.7976931348623157e308,
                    "tiny": 5e-324,
                    "frac": fractions.Fraction(1, 3),
                }
            )
        ],
    ),
    ("strings", [ev({"s": "text", "empty": "", "uni": "héllo ☃ 😀", "long": "x" * 300})]),
    ("str subclass values", [ev({"tag": Tag("a"), "plain": Plain("b"), "mode": Mode.fast})]),
    ("str subclass keys dropped", [ev({Plain("k"): 1, Tag("t"): 2, Mode.fast: 3, "ok": 4})]),
    ("non-str keys dropped", [ev({1: 1, None: 2, ("a",): 3, b"k": 4, "ok": 5})]),
    ("unconvertible values", [ev({"none": None, "obj": object(), "list": [1], "d": {}})]),
    ("non-mapping measurements", [ev([("x", 1)]), ev([]), ev(0), ev(""), ev("abc")]),
    ("non-dict mapping", [ev(Frozen({"a": 1, "b": 2.5}), Frozen({"k": "v", 1: 2}))]),
    ("mappingproxy", [ev(types.MappingProxyType({"a": 1}), types.MappingProxyType({"k": "v"}))]),
    ("empty", [ev({}, {}), ev(None, None), ev({}, None, "")]),
    ("None metadata skipped", [ev({"x": 1}, {"a": None, "b": "v"})]),
    (
        "metadata stringified",
        [ev({}, {1: 2, "f": 1.5, (1, 2): None, "t": True, Plain("p"): Plain("q"), "l": [1]})],
    ),
    ("metadata str subclasses", [ev({}, {"mode": Mode.fast, Mode.fast: "x", Tag("k"): Tag("v")})]),
    ("metadata str raises", [ev({"x": 1}, {"bad": Unprintable(), "ok": "v"})]),
    ("metadata key str raises", [ev({"x": 1}, {Unprintable(): "v", "ok": "v"})]),
    ("metadata colliding keys", [ev({}, {1: "int", "1": "str"})]),
    ("non-mapping metadata", [ev({"x": 1}, "not a dict"), ev({}, []), ev({}, 0), ev({}, "")]),
    ("long metadata", [ev({}, {"k" * 200: "v" * 20_000, "short": "é" * 70})]),
    ("unicode", [ev({"ключ": 1, "名前": "値"}, {"ключ": "значение"}, "id-☃", parts=("ü", "名"))]),
    ("correlation non-str", [ev(correlation_id=42), ev(correlation_id=Tag("c"))]),
    ("correlation falsy non-str", [ev(correlation_id=0), ev(correlation_id=False)]),
    ("correlation Plain empty", [ev(correlation_id=Plain(""))]),
    ("correlation str raises", [ev({"x": 1}, correlation_id=Unprintable()), ev({"y": 2})]),
    ("truth value raises", [ev(Ambiguous()), ev({}, Ambiguous()), ev(correlation_id=Ambiguous())]),
    (
        "timestamps around the base",
        [ev(timestamp_ns=BASE + d) for d in (0, -1, -(2**40), 1, 127, 128, 2**28, 2**40, -BASE)],
    ),
    ("base zero", [ev(timestamp_ns=0), ev(timestamp_ns=5), ev(timestamp_ns=2**62)]),
    ("negative base", [ev(timestamp_ns=-5), ev(timestamp_ns=7)]),
    (
        "span ids",
        [ev(span_id=1), ev(span_id=2**64 - 1), ev({"x": 1}, {"k": "v"}, "c", span_id=2**63)],
    ),
    (
        "tracebacks",
        [
            ev(span_id=5, stack=(("a.py", 3, "f"), ("", 0, ""), ("é/☃.py", 2**32 - 1, "C.m"))),
            ev(parts=("python", "call", "exception"), stack=(("b.py", 1, "g"),) * 40),
        ],
    ),
    (
        "varint timestamps",
        [ev(timestamp_ns=BASE)] + [ev(timestamp_ns=BASE + v) for v in VARINT_EDGES if v < 2**60],
    ),
]


@pytest.mark.parametrize("events", [c[1] for c in EDGE_CASES], ids=[c[0] for c in EDGE_CASES])
def test_edge_cases(events: list[wire.RawEvent]) -> None:
    check_twice(events)


def test_edge_cases_in_one_batch() -> None:
    events = [e for _, case in EDGE_CASES for e in case]
    check_twice(events)
    # And every suffix, so each case sets the batch base and follows others' caches.
    encoder = wire.BatchEncoder()
    for i in range(len(events)):
        check(encoder, events[i:])


def test_warm_cache_does_not_leak_into_lookalikes() -> None:
    """Values equal to cached plain strings must still convert by their own rules."""
    encoder = wire.BatchEncoder()
    check(encoder, [ev({"x": 1}, {"mode": "fast", "fast": "x", "k": "v"}, "c")])
    check(encoder, [ev({"x": 1}, {"mode": Mode.fast, Mode.fast: "x", Tag("k"): Tag("v")}, "c")])
    check(encoder, [ev({"x": 1}, {"mode": "fast"}, Tag("c"))])
    # A cached name, falsy non-mappings and falsy non-str correlation ids.
    for raw in (ev([], {}), ev({}, ""), ev(0, 0), ev({"x": 1}, None, 0), ev(False, False)):
        check(encoder, [raw])


def test_counts_of_known_drops() -> None:
    encoder = wire.BatchEncoder()
    _, _, encoded, dropped, errors, _ = check(encoder, [ev([("x", 1)])])
    assert (encoded, dropped, errors) == (1, 1, 0)
    _, _, encoded, dropped, errors, _ = check(encoder, [ev({"a": 2**63, 1: 1, Plain("k"): 1})])
    assert (encoded, dropped, errors) == (1, 3, 0)
    _, _, encoded, dropped, errors, _ = check(encoder, [ev({}, {"a": Unprintable(), "b": None})])
    assert (encoded, dropped, errors) == (1, 0, 1)
    _, _, encoded, dropped, errors, _ = check(encoder, [ev({}, correlation_id=Unprintable())])
    assert (encoded, dropped, errors) == (0, 0, 1)


# ---------------------------------------------------------------- surrogates


def test_lone_surrogates_never_reach_the_wire() -> None:
    """Invalid UTF-8 would make the receiver reject the whole batch."""
    bad = "bad\ud800"
    good = ev({"ok": 1}, {"k": "v"}, "c")
    cases = [
        # (raw event, event kept?, errors)
        (ev({"s": bad}), False, 1),
        (ev({bad: 1}), False, 1),
        (ev(correlation_id=bad), False, 1),
        (ev(parts=("a", bad)), False, 1),
        # A metadata entry is dropped on its own; the rest of the event stays.
        (ev({"x": 1}, {"k": bad, "ok": "v"}), True, 1),
        (ev({"x": 1}, {bad: "v", "ok": "v"}), True, 1),
    ]
    for encoder in (wire.BatchEncoder(), wire.BatchEncoder()):
        check(encoder, [good])  # warm caches for the second round
        for raw, kept, want_errors in cases:
            payload, consumed, encoded, _, errors, _ = encoder.encode([good, raw, good])
            batch = pb.TelemetryEventBatch.FromString(payload)
            assert consumed == 3 and encoded == 2 + kept and errors == want_errors
            assert [list(e.event_parts) for e in batch.events][0] == ["python", "call", "stop"]
            for event in batch.events:
                for text in [*event.event_parts, *event.metadata, *event.metadata.values()]:
                    text.encode("utf-8")  # valid UTF-8 came back
            if kept:
                assert dict(batch.events[1].metadata) == {"ok": "v"}
                assert batch.events[1].measurements["x"].int_value == 1


# ---------------------------------------------------------------- generated

NAMES = [
    ("python", "call", "stop"),
    ("tool", "execution", "start"),
    ("a",),
    ("ü", "名前"),
    ("x",) * 9,
]
KEYS = ["duration", "rows", "ratio", "k", "ключ", "x" * 100]
META_KEYS = ["command", "tool", "result", "k", "ключ"]
META_VALUES = ["predict", "ok", "error", "", "é" * 40, "v" * 64, "w" * 65, "值"]


def random_scalar(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.35:
        return rng.choice(
            [
                *VARINT_EDGES,
                INT64_MIN,
                -(2**63) - 1,
                2**63,
                rng.randrange(-(2**64), 2**64),
                rng.randrange(1 << 14),
                rng.randrange(1 << 28),
            ]
        )
    if roll < 0.6:
        return rng.choice(
            [rng.uniform(-1e6, 1e6), math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, 5e-324]
        )
    if roll < 0.75:
        return rng.choice(["", "ok", "é", "x" * rng.randrange(200), Tag("t"), Plain("p")])
    return rng.choice([True, False, Level.LOW, Level.HIGH, Mode.fast, None, object(), [1]])


def random_measurements(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, [], 0, "", [("x", 1)], Ambiguous()])
    out: dict[Any, Any] = {}
    for _ in range(rng.randrange(6)):
        key: Any = rng.choice(KEYS)
        if rng.random() < 0.05:
            key = rng.choice([1, Plain("rows"), Mode.fast, None])
        out[key] = random_scalar(rng)
    return Frozen(out) if rng.random() < 0.05 else out


def random_metadata(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.05:
        return rng.choice([None, [], 0, "", "text", Ambiguous()])
    out: dict[Any, Any] = {}
    for _ in range(rng.randrange(5)):
        key: Any = rng.choice(META_KEYS)
        value: Any = rng.choice(META_VALUES)
        if rng.random() < 0.1:
            key = rng.choice([1, 2.5, Plain("tool"), Tag("tool"), Mode.fast])
        if rng.random() < 0.15:
            value = rng.choice([None, 7, 1.5, True, Plain("ok"), Tag("ok"), Mode.fast])
        if rng.random() < 0.01:
            value = Unprintable()
        out[key] = value
    return out


def random_event(rng: random.Random, base: int) -> wire.RawEvent:
    cid = rng.choice([None, None, "", "cid-1", "c" * 70, "☃", 0, 17, Plain("p"), Tag("t")])
    offset = rng.choice([0, *VARINT_EDGES, -7, -(2**30), rng.randrange(-(2**20), 2**40)])
    return (
        rng.choice(NAMES),
        random_measurements(rng),
        random_metadata(rng),
        cid,
        min(INT64_MAX, max(0, base + offset)),  # time_ns() is always in range
        rng.choice([0, 0, 1, rng.randrange(1, 2**64)]),
        rng.choice([(), (), (("f.py", rng.randrange(0, 2**32), "fn"), ("", 0, "☃"))]),
    )


@pytest.mark.parametrize("seed", range(6))
def test_generated_events_match_reference(seed: int) -> None:
    rng = random.Random(seed)
    encoder = wire.BatchEncoder()
    for _ in range(25):
        base = rng.choice([BASE, BASE, 0, 1, 2**62])
        events = [random_event(rng, base) for _ in range(rng.randrange(1, 60))]
        check(encoder, events)  # the shared encoder has warm caches after a while
        check(wire.BatchEncoder(), events)


# ------------------------------------------------------------ caches, bounds


def test_caches_stay_bounded() -> None:
    encoder = wire.BatchEncoder()
    for start in range(0, 6000, 500):
        events = [
            ev({f"key{i}": i}, {f"meta{i}": f"value{i}"}, parts=("unique", f"n{i}"))
            for i in range(start, start + 500)
        ]
        check(encoder, events)
    assert len(encoder._names) <= 4096
    assert len(encoder._heads) <= 4096
    assert len(encoder._pairs) <= 4096
    # Still right after the caches were cleared and refilled.
    check(encoder, [ev({"key1": 1, "key5999": 2}, {"meta1": "value1"}, parts=("unique", "n1"))])


def test_cache_memory_bounded_for_long_keys() -> None:
    """Long unique keys must not be cached in many copies each."""
    encoder = wire.BatchEncoder()
    events = [
        ev({f"{i}" + "m" * 20_000: i}, {f"{i}" + "k" * 20_000: "v"}, parts=("p", f"{i}"))
        for i in range(60)
    ]
    check(encoder, events, max_bytes=1 << 24)
    check(encoder, events, max_bytes=1 << 24)
    cached = sum(len(b) for heads in encoder._heads.values() for b in heads)
    cached += sum(len(b) for b in encoder._pairs.values())
    assert cached < 4 * 1024 * 1024  # 60 keys of 20 KB: at most a few copies each


def framed(raw: wire.RawEvent) -> int:
    """Size of one event inside a batch (tag, length, body), at most: its offset
    from the batch base is taken as large as a timestamp gets."""
    anchor = ev(timestamp_ns=1)
    encoder = wire.BatchEncoder()
    return len(encoder.encode([anchor, raw])[0]) - len(encoder.encode([anchor])[0])


def test_max_bytes_splits_batches() -> None:
    events = [ev({"seq": i, "ratio": i / 3}, {"command": f"c{i % 7}"}, "cid") for i in range(1000)]
    events = [(*e[:4], BASE + i * 1000, *e[5:]) for i, e in enumerate(events)]
    largest = max(framed(e) for e in events)
    encoder = wire.BatchEncoder()
    max_bytes = 2000
    got: list[tuple[Any, ...]] = []
    rest = events
    batches = 0
    while rest:
        payload, consumed, encoded, dropped, errors, oversized = encoder.encode(rest, max_bytes)
        assert 0 < consumed <= len(rest) and encoded == consumed
        assert not dropped and not errors and not oversized
        # Never over the bound, and full but for less than one more event.
        assert len(payload) <= max_bytes
        if consumed < len(rest):
            assert len(payload) > max_bytes - largest
        got += decode(payload)
        rest = rest[consumed:]
        batches += 1
    assert batches >= 1000 * 30 // max_bytes
    assert got == [normal(Ref(e).message) for e in events]  # type: ignore[arg-type]


def test_event_larger_than_max_bytes_dropped() -> None:
    big = ev({"x": 1}, {"blob": "b" * 5000})
    small = ev({"x": 2})
    encoder = wire.BatchEncoder()
    payload, consumed, encoded, dropped, errors, oversized = encoder.encode([big], 1000)
    assert (consumed, encoded, dropped, errors, oversized) == (1, 0, 0, 0, 1)
    assert list(pb.TelemetryEventBatch.FromString(payload).events) == []
    # After another event, the big one waits for the next batch, where it is
    # alone and dropped; the batches never exceed the bound.
    rest = [small, big, small]
    got: list[int] = []
    counts = [0, 0]
    while rest:
        payload, consumed, encoded, _, errors, oversized = encoder.encode(rest, 1000)
        assert consumed > 0 and len(payload) <= 1000 and not errors
        counts[0] += encoded
        counts[1] += oversized
        got += [e[1]["x"][1] for e in decode(payload)]
        rest = rest[consumed:]
    assert counts == [2, 1] and got == [2, 2]


def test_an_event_exactly_filling_the_bound_is_sent() -> None:
    event = ev({"x": 1}, {"blob": "b" * 900})
    size = len(wire.BatchEncoder().encode([event], 10_000)[0])
    payload, consumed, encoded, _, _, oversized = wire.BatchEncoder().encode([event], size)
    assert (len(payload), consumed, encoded, oversized) == (size, 1, 1, 0)
    payload, consumed, encoded, _, _, oversized = wire.BatchEncoder().encode([event], size - 1)
    assert (consumed, encoded, oversized) == (1, 0, 1)


def test_empty_input() -> None:
    assert wire.BatchEncoder().encode([]) == (b"", 0, 0, 0, 0, 0)


@pytest.mark.parametrize("value", [*VARINT_EDGES, INT64_MIN, -(2**31), -128])
def test_varint_matches_protobuf(value: int) -> None:
    """wire.varint against the protobuf runtime (negatives: 10-byte two's complement)."""
    want = pb.TelemetryValue(int_value=value).SerializeToString()[1:]
    assert wire.varint(value) == want
