#!/usr/bin/env python3
"""Writes the seed corpus and dictionaries of the fuzz targets.

    python3 native/fuzz/gen_corpus.py      # rewrites corpus/<target>/ and dict/

Seeds are built from catalog.toml (every event Python can emit, with its
documented measurements and metadata) plus edge cases: unknown and malformed
names, NaN and infinities, non-numeric values, limits, multi-byte text at the
truncation boundary, invalid UTF-8, unknown fields, truncated messages. The
protobuf encoding is written out by hand (no dependency), so bytes no Python
protobuf library would produce are possible too. Run `cargo fuzz cmin` on the
result (script/fuzz --cmin does both) so only seeds that add coverage stay.
"""

import hashlib
import json
import shutil
import struct
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
CATALOG = HERE.parent / "snakepit_telemetry_core" / "catalog.toml"
PREFIX = "SNAKEPIT_TELEMETRY_EVENT "
# Registered by the targets (src/lib.rs CUSTOM_EVENT / CUSTOM_KEY).
CUSTOM_EVENT = "fuzz.custom.stop"
CUSTOM_KEY = "fuzz_custom_key"
I64_MAX = 2**63 - 1
I64_MIN = -(2**63)

# --- protobuf wire encoding ---------------------------------------------------


def varint(n):
    n &= (1 << 64) - 1  # negative int64 is ten bytes of two's complement
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def b(s):
    return s if isinstance(s, bytes) else s.encode()


def field_varint(num, n):
    return varint(num << 3) + varint(n)


def field_len(num, payload):
    payload = b(payload)
    return varint(num << 3 | 2) + varint(len(payload)) + payload


def field_double(num, f):
    return varint(num << 3 | 1) + struct.pack("<d", f)


def value(v):
    """A TelemetryValue: int, float, str/bytes (string_value), or None (empty)."""
    if v is None:
        return b""
    if isinstance(v, (bool, int)):
        return field_varint(1, int(v))
    if isinstance(v, float):
        return field_double(2, v)
    return field_len(3, v)


def event(parts, measurements=(), metadata=(), ts=0, corr="", extra=b""):
    out = bytearray()
    for p in parts:
        out += field_len(1, p)
    for k, v in measurements:
        out += field_len(2, field_len(1, k) + field_len(2, value(v)))
    for k, v in metadata:
        out += field_len(3, field_len(1, k) + field_len(2, v))
    if ts:
        out += field_varint(4, ts)
    if corr:
        out += field_len(5, corr)
    return bytes(out) + extra


def field_fixed64(num, n):
    return varint(num << 3 | 1) + struct.pack("<Q", n & ((1 << 64) - 1))


def span(span_id, frames=()):
    """TelemetryEvent.span_id (6, fixed64) and stacktrace (7, TelemetryFrame {file, line, function})."""
    out = field_fixed64(6, span_id) if span_id else b""
    for file, line_no, function in frames:
        out += field_len(7, field_len(1, file) + field_varint(2, line_no) + field_len(3, function))
    return out


def batch(events, base=0):
    out = bytearray()
    for e in events:
        out += field_len(1, e)
    if base:
        out += field_varint(2, base)
    return bytes(out)


# --- catalog --------------------------------------------------------------------

catalog = tomllib.loads(CATALOG.read_text())["event"]
python_events = [e for e in catalog if e.get("python")]
measurement_keys = sorted({k for e in catalog for k in e["measurements"]})
metadata_keys = sorted({k for e in catalog for k in e["metadata"]} | {"correlation_id"})
STANDARD_META = [("worker_id", "w-1"), ("pool_name", "default"), ("node", "py@host")]
# decode.rs RESERVED_METADATA_KEYS: dropped from Python events and counted.
RESERVED_META = [
    "node",
    "pool_name",
    "worker_id",
    "telemetry_span_context",
    "emit_time",
    "kind",
    "reason",
    "stacktrace",
]


def sample(unit):
    return {"native_time": 1_500_000, "bytes": 1 << 20, "count": 3, "percent": 12.5}[unit]


def real(e, ts=1_764_000_000_000_000_000):
    parts = e["python"].split(".")
    meas = [(k, sample(u)) for k, u in e["measurements"].items()]
    meta = [(k, f"{k}-value") for k in e["metadata"]] + STANDARD_META
    return parts, meas, meta, ts


# --- seeds -------------------------------------------------------------------------

long_text = "é" * 40 + "x"  # 81 bytes: truncation lands inside a character at odd limits
emoji = "😀" * 3  # 4-byte characters around the tight 5-byte value limit


def event_seeds():
    seeds = {}
    for e in python_events:
        parts, meas, meta, ts = real(e)
        seeds[f"catalog_{e['python']}"] = event(parts, meas, meta, ts, corr="req-1")
    seeds["custom"] = event(
        CUSTOM_EVENT.split("."), [(CUSTOM_KEY, 1), ("duration", 9)], [(CUSTOM_KEY, "v")]
    )
    stop = ["python", "call", "stop"]
    seeds["empty"] = b""
    seeds["unknown_event"] = event(["zz", "made", "up"], [("duration", 1)])
    seeds["prefix_of_event"] = event(["python", "call"])
    seeds["longer_than_event"] = event(stop + ["extra"])
    seeds["empty_part"] = event(["python", "", "stop"])
    seeds["too_many_parts"] = event(["a"] * 9)
    seeds["long_part"] = event(["x" * 65])
    seeds["dotted_part"] = event(["python.call", "stop"])
    seeds["bad_values"] = event(
        stop,
        [
            ("nan", float("nan")),
            ("inf", float("inf")),
            ("neg_inf", float("-inf")),
            ("text", "12"),
            ("empty", None),
            ("ok", 0.5),
            ("duration", I64_MAX),
            ("system_time", I64_MIN),
            ("monotonic_time", 1e308),
            ("cpu_time", -1e308),
        ],
    )
    seeds["limits"] = event(
        stop,
        [(f"m{i}", i) for i in range(34)] + [("k" * 129, 1)],
        [(f"d{i}", "v") for i in range(34)] + [("k" * 129, "v")],
    )
    seeds["truncation"] = event(
        stop,
        [],
        [("command", long_text), ("result", emoji), ("correlation_id", emoji)],
        corr=long_text,
    )
    seeds["corr_from_metadata"] = event(stop, [], [("correlation_id", "from-meta")])
    seeds["corr_empty_field_and_meta"] = event(stop, [], [("correlation_id", "")])
    seeds["negative_ts"] = event(stop, [("duration", -5)], ts=-1)
    seeds["invalid_utf8_part"] = event([b"python", b"ca\xffll", b"stop"])
    seeds["invalid_utf8_value"] = event(stop, [], [("command", b"\xc3\x28")])
    seeds["invalid_utf8_key"] = event(stop, [(b"\xe2\x82", 1)])
    seeds["duplicate_keys"] = event(
        stop, [("duration", 1), ("duration", 2.5)], [("a", "1"), ("a", "2")]
    )
    seeds["unknown_fields"] = event(
        stop,
        extra=field_varint(15, 7)
        + field_len(99, b"junk")
        + field_double(6, 1.0)
        + varint(7 << 3 | 5)
        + b"\x00\x00\x80\x7f",
    )
    exc = ["python", "call", "exception"]
    frames = [("app/tools.py", 42, "Tool.run"), ("", 0, ""), (long_text, 1, emoji)]
    seeds["span_start"] = event(["python", "call", "start"], extra=span(I64_MAX))
    seeds["span_exception"] = event(
        exc, [("duration", 5)], [("error_type", "ValueError")], extra=span(2**64 - 1, frames)
    )
    seeds["span_many_frames"] = event(exc, extra=span(7, frames * 12))
    seeds["frames_on_stop"] = event(stop, extra=span(0, frames))
    seeds["reserved_keys"] = event(
        stop,
        [("monotonic_time", 1), ("duration", 2)],
        [(k, "spoofed") for k in RESERVED_META] + [("command", "predict")],
    )
    seeds["wrong_wire_type"] = varint(1 << 3 | 0) + varint(5) + event(stop)
    seeds["truncated"] = event(stop, [("duration", 1500)], [("command", "predict")])[:-3]
    seeds["overlong_length"] = field_len(1, "python")[:1] + varint(1 << 40)
    seeds["deep_value_oneof_twice"] = event(
        stop,
        extra=field_len(
            2, field_len(1, "duration") + field_len(2, value(1) + value(2.0) + value("s"))
        ),
    )
    return seeds


def batch_seeds(ev):
    stop = ["python", "call", "stop"]
    good = [event(*real(e)[:3], ts=i * 1000) for i, e in enumerate(python_events)]
    seeds = {
        "empty": b"",
        "all_catalog_events": batch(good[:12], base=1_764_000_000_000_000_000),
        "rest_of_catalog": batch(good[12:]),
        "one_good": batch([ev["catalog_python.call.stop"]]),
        "mixed_good_and_dropped": batch(
            [
                ev["catalog_python.call.stop"],
                ev["unknown_event"],
                ev["empty_part"],
                ev["bad_values"],
                ev["custom"],
            ]
        ),
        "invalid_utf8_in_one_event": batch(
            [
                ev["catalog_python.call.stop"],
                ev["invalid_utf8_value"],
                ev["catalog_tool.execution.stop"],
            ]
        ),
        "base_overflow": batch([event(stop, ts=I64_MAX), event(stop, ts=I64_MIN)], base=I64_MAX),
        "negative_base": batch([event(stop, ts=5)], base=-10),
        "empty_events": batch([b"", b"", b""]),
        "limits_and_truncation": batch([ev["limits"], ev["truncation"]]),
        "truncated": batch([ev["catalog_python.call.stop"]] * 3)[:-4],
        "unknown_fields": batch([ev["catalog_python.call.stop"]])
        + field_len(9, b"x")
        + field_varint(3, 1),
        "event_as_batch": ev["catalog_python.call.stop"],
    }
    return seeds


def line(obj):
    return (PREFIX + json.dumps(obj, ensure_ascii=False)).encode()


def json_seeds():
    seeds = {}
    for e in python_events:
        parts, meas, meta, ts = real(e)
        seeds[f"catalog_{e['python']}"] = line(
            {
                "event_parts": parts,
                "measurements": dict(meas),
                "metadata": dict(meta),
                "timestamp_ns": ts,
                "correlation_id": "req-1",
            }
        )
    stop = ["python", "call", "stop"]
    seeds.update(
        {
            "custom": line(
                {"event_parts": CUSTOM_EVENT.split("."), "measurements": {CUSTOM_KEY: 1}}
            ),
            "minimal": line({"event_parts": stop}),
            "not_telemetry": b"Traceback (most recent call last):",
            "prefix_only": PREFIX.encode(),
            "not_json": (PREFIX + "{not json").encode(),
            "unknown": line({"event_parts": ["zz", "made", "up"]}),
            "malformed_name": line({"event_parts": ["python", "", "stop"]}),
            "no_parts": line({"measurements": {"duration": 1}}),
            "parts_not_strings": (PREFIX + '{"event_parts":["python",1,null]}').encode(),
            "value_kinds": (
                PREFIX + '{"event_parts":["python","call","stop"],'
                '"measurements":{"duration":1500,"ratio":0.5,'
                '"bad":"NaN","inf":"Infinity","big":18446744073709551615,"neg":-9223372036854775808,'
                '"exp":1e308,"t":true,"n":null,"o":{"a":1},"l":[1,2]},'
                '"metadata":{"command":"predict","n":3,"f":1.5,"b":false,"z":null,"o":{"k":[1,"x"]}},'
                '"timestamp_ns":-7,"correlation_id":"c1"}\r\n'
            ).encode(),
            "escapes": (
                PREFIX + '{"event_parts":["python","call","st\\u006fp"],'
                '"metadata":{"command":"\\ud83d\\ude00\\n\\"","lone":"\\ud800"}}'
            ).encode(),
            "duplicate_field": (
                PREFIX + '{"event_parts":["python","call","stop"],"event_parts":["x"]}'
            ).encode(),
            "wrong_types": (
                PREFIX + '{"event_parts":"python.call.stop","timestamp_ns":1.5}'
            ).encode(),
            "truncation": line(
                {
                    "event_parts": stop,
                    "metadata": {"command": long_text, "correlation_id": emoji},
                    "correlation_id": "",
                }
            ),
            "limits": line({"event_parts": stop, "measurements": {f"m{i}": i for i in range(34)}}),
            "too_large": line({"event_parts": stop, "metadata": {"x": "y" * 2100}}),
            "deep_nesting": (
                PREFIX + '{"event_parts":["a"],"metadata":{"x":' + "[" * 200 + "]" * 200 + "}}"
            ).encode(),
            "trailing_garbage": line({"event_parts": stop}) + b" {}",
            "span": line(
                {
                    "event_parts": ["python", "call", "exception"],
                    "span_id": 2**64 - 1,
                    "stacktrace": [
                        {"file": "a.py", "line": 3, "function": "f"},
                        {"line": -1},
                        7,
                        {"file": long_text, "function": emoji},
                    ],
                    "metadata": {k: "spoofed" for k in RESERVED_META},
                }
            ),
            "span_id_kinds": (
                PREFIX + '{"event_parts":["python","call","stop"],"span_id":"12",'
                '"stacktrace":{"file":"a.py"}}'
            ).encode(),
        }
    )
    return seeds


# --- dictionaries -----------------------------------------------------------------


def dict_entry(raw):
    def char(c):
        return chr(c) if 32 <= c < 127 and chr(c) not in '"\\' else f"\\x{c:02x}"

    return '"' + "".join(char(c) for c in raw) + '"'


def names():
    words = set(measurement_keys) | set(metadata_keys) | {CUSTOM_EVENT, CUSTOM_KEY}
    words |= set(RESERVED_META)
    for e in python_events:
        words.add(e["python"])
        words.update(e["python"].split("."))
    return sorted(words)


def proto_dict():
    entries = [field_len(1, w) for w in names()]  # as a length-prefixed string field
    tags = [bytes([t]) for t in (0x0A, 0x12, 0x1A, 0x20, 0x2A, 0x31, 0x3A, 0x08, 0x10, 0x11)]
    specials = [
        struct.pack("<d", float("nan")),
        struct.pack("<d", float("inf")),
        varint(-1),
        varint(I64_MAX),
        b"\xff",
        b"\xc3\x28",
    ]
    return entries + tags + specials


def json_dict():
    keys = ["event_parts", "measurements", "metadata", "timestamp_ns", "correlation_id"]
    keys += ["span_id", "stacktrace", "file", "line", "function"]
    entries = [f'"{k}":'.encode() for k in keys] + [f'"{w}"'.encode() for w in names()]
    entries += [PREFIX.encode(), b"NaN", b"Infinity", b"1e308"]
    entries += [b"-9223372036854775808", b"18446744073709551615"]
    entries += [b"\\ud800", b"\\u0000", b"null", b"true", b"[]", b"{}"]
    return entries


def write(target, seeds):
    out = HERE / "corpus" / target
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for data in seeds.values():
        # Named by content, as libFuzzer names the files it adds.
        digest = hashlib.sha1(data).hexdigest()
        (out / digest).write_bytes(data)
    print(f"{target}: {len(seeds)} seeds")


def main():
    ev = event_seeds()
    write("event_decode", ev)
    write("batch_decode", batch_seeds(ev))
    write("json_line", json_seeds())
    (HERE / "dict").mkdir(exist_ok=True)
    for name, entries in [("protobuf", proto_dict()), ("json_line", json_dict())]:
        text = "".join(dict_entry(e) + "\n" for e in entries)
        (HERE / "dict" / f"{name}.dict").write_text(text)


if __name__ == "__main__":
    main()
