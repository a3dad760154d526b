"""Protobuf wire encoding of ``TelemetryEventBatch`` without building messages.

Building one protobuf object per event costs several microseconds in Python, so
the batched RPC writes the wire format directly: the encoded forms of event names,
measurement keys and repeated metadata pairs are cached, and timestamps are small
offsets from the batch's ``base_timestamp_ns``. The output parses as an ordinary
``TelemetryEventBatch``; the tests check it against the protobuf runtime.

Conversion rules are those of :mod:`.convert` (same drops, same counts), applied
here in the same pass as the encoding. Everything runs on the stream thread.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from .convert import INT64_MAX, INT64_MIN, coerce_measurement

# A queued event as emit left it: validated name parts, the caller's measurements
# and metadata (converted only here), correlation id, wall-clock nanoseconds, the
# span id (0 outside spans) and, on a span's exception event, its traceback
# frames (see .spans; empty otherwise).
RawEvent = tuple[tuple[str, ...], Any, Any, Any, int, int, tuple[tuple[str, int, str], ...]]
# The last two fields of an event outside any span.
NO_SPAN_FIELDS: tuple[int, tuple[()]] = (0, ())

_CACHE_LIMIT = 4096
# Default size bound of one batch (the stream also keeps it within the
# receiver's max_message_bytes, SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES).
MAX_BATCH_BYTES = 1 << 20
# Metadata values longer than this are not worth caching (and could flood it).
_CACHED_VALUE_BYTES = 64
# Nor are longer measurement or metadata keys: a measurement key is cached as
# 128 encoded heads, so a long unique key would cost 128 copies of itself.
_CACHED_KEY_CHARS = 64
# Value-message lengths with a precomputed measurement head: every int (2..11
# bytes) and float (9); longer string values build their head when needed.
_HEAD_LENGTHS = 16

_pack_double = struct.Struct("<d").pack
_pack_fixed64 = struct.Struct("<Q").pack


def _varint_loop(value: int) -> bytes:
    out = bytearray()
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


# Varints of 0..16383, and the two leading bytes (continuation bits set) of the
# low 14 bits of a larger number: together they cover values below 2**28 (event
# lengths, timestamp offsets, typical durations) with two table lookups.
# The two tables take about 1.4 MB per process.
_V14 = [_varint_loop(i) for i in range(16384)]
_LO14 = [bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(16384)]
_LIMIT28 = 1 << 28

# Field tags: (field number << 3) | wire type.
_TAG_BATCH_EVENT = b"\x0a"  # TelemetryEventBatch.events, length-delimited
_TAG_BATCH_BASE = b"\x10"  # TelemetryEventBatch.base_timestamp_ns, varint
_TAG_PART = b"\x0a"  # TelemetryEvent.event_parts
_TAG_MEASUREMENT = b"\x12"  # TelemetryEvent.measurements (map entry)
_TAG_METADATA = b"\x1a"  # TelemetryEvent.metadata (map entry)
_TAG_TIMESTAMP = b"\x20"  # TelemetryEvent.timestamp_ns, varint
_TAG_CORRELATION = b"\x2a"  # TelemetryEvent.correlation_id
_TAG_SPAN_ID = b"\x31"  # TelemetryEvent.span_id, fixed64
_TAG_FRAME = b"\x3a"  # TelemetryEvent.stacktrace (a TelemetryFrame)
_TAG_FRAME_FILE = b"\x0a"  # TelemetryFrame.file
_TAG_FRAME_LINE = b"\x10"  # TelemetryFrame.line, varint
_TAG_FRAME_FUNCTION = b"\x1a"  # TelemetryFrame.function
_TAG_KEY = b"\x0a"  # map entry key
_TAG_VALUE = b"\x12"  # map entry value
_TAG_INT = b"\x08"  # TelemetryValue.int_value
_TAG_FLOAT = b"\x11"  # TelemetryValue.float_value, fixed64
_TAG_STRING = b"\x1a"  # TelemetryValue.string_value


def varint(value: int) -> bytes:
    """Base-128 varint; negative numbers as 64-bit two's complement (int64)."""
    if value < 0:
        value += 1 << 64
    if value < 16384:
        return _V14[value]
    if value < _LIMIT28:
        return _LO14[value & 0x3FFF] + _V14[value >> 14]
    return _varint_loop(value)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload


def _string_field(tag: bytes, text: str) -> bytes:
    # Strict: a lone surrogate raises here rather than reaching the wire as
    # invalid UTF-8, which would make the receiver reject the whole batch.
    return _delimited(tag, text.encode("utf-8"))


def _measurement_heads(key: str) -> list[bytes]:
    """Everything before a measurement's value message, by value-message length.

    The map entry's length depends only on the value message's length, so each
    key's encodings are precomputed once for the lengths numbers can have
    (below ``_HEAD_LENGTHS``): at most 16 short byte strings per cached key.
    """
    prefix = _string_field(_TAG_KEY, key) + _TAG_VALUE
    return [
        _TAG_MEASUREMENT + varint(len(prefix) + len(_V14[n]) + n) + prefix + _V14[n]
        for n in range(_HEAD_LENGTHS)
    ]


class _Unusual(Exception):
    """Raised inside the fast path: take the general path for this event."""


class BatchEncoder:
    """Encodes queued events into ``TelemetryEventBatch`` bytes; one per stream thread.

    Caches are bounded and simply cleared when full, so hostile unique names or
    keys cost speed, never memory.
    """

    __slots__ = ("_heads", "_names", "_pairs")

    def __init__(self) -> None:
        self._names: dict[tuple[str, ...], bytes] = {}
        # Measurement key -> map-entry heads by value length (_measurement_heads).
        self._heads: dict[str, list[bytes]] = {}
        # (key, value) -> whole encoded metadata map entry, tag included.
        self._pairs: dict[tuple[str, str], bytes] = {}

    def encode(
        self, events: list[RawEvent], max_bytes: int = MAX_BATCH_BYTES
    ) -> tuple[bytes, int, int, int, int, int]:
        """Encode a prefix of ``events`` as one batch of at most ``max_bytes``.

        Events are added while the payload stays within ``max_bytes``: the
        payload never exceeds it. An event that does not fit after others is
        left for the next batch; one that does not fit even alone is left out
        and counted as oversized.

        Returns ``(payload, consumed, encoded, measurements_dropped, errors,
        oversized)``: the first ``consumed`` events were handled, ``encoded`` of
        them are in the payload, ``oversized`` were too large for any batch. An
        event that fails to convert (e.g. a correlation id whose ``str`` raises)
        is left out and counted in ``errors``, as are metadata entries that fail.
        """
        base = events[0][4] if events else 0
        out = [_TAG_BATCH_BASE, varint(base)] if base > 0 else []
        if base < 0:
            base = 0
        append = out.append
        encoded = dropped = errors = consumed = oversized = 0
        total = len(out[1]) + 1 if out else 0  # bytes in out so far
        v14 = _V14
        for event in events:
            event_dropped = event_errors = 0
            try:
                body = self._common(event, base)
            except Exception:
                try:
                    body, event_dropped, event_errors = self._general(event, base)
                except Exception:
                    consumed += 1
                    errors += 1
                    continue
            size = len(body)
            length = v14[size] if size < 16384 else varint(size)
            framed = 1 + len(length) + size
            if total + framed > max_bytes:
                if encoded:
                    break  # the next batch starts with it
                consumed += 1
                oversized += 1
                continue
            consumed += 1
            dropped += event_dropped
            errors += event_errors
            append(_TAG_BATCH_EVENT)
            append(length)
            append(body)
            total += framed
            encoded += 1
        return b"".join(out), consumed, encoded, dropped, errors, oversized

    def _common(self, event: RawEvent, base: int) -> bytes:
        """The usual event: dicts of str keys, int/float measurements, str metadata.

        Raises (``_Unusual`` or whatever a cache-miss encoding raises) for
        anything else, and :meth:`_general` handles that event instead.
        """
        parts, raw_measurements, raw_metadata, correlation_id, timestamp_ns, span_id, stack = event
        name = self._names.get(parts)
        if name is None or stack:
            raise _Unusual  # a traceback (rare: failed spans) takes the general path
        chunks = [name]
        push = chunks.append
        v14 = _V14
        # "is not None", not truthiness: a falsy non-dict ([], 0, "") is counted
        # as dropped by the general path, and truthiness itself may raise.
        if raw_measurements is not None:
            if type(raw_measurements) is not dict:
                raise _Unusual
            heads = self._heads
            for key, value in raw_measurements.items():
                kind = type(value)
                if type(key) is not str:
                    raise _Unusual
                if kind is int:
                    if 0 <= value < 16384:
                        encoded_value = _TAG_INT + v14[value]
                    elif 0 < value < _LIMIT28:
                        encoded_value = _TAG_INT + _LO14[value & 0x3FFF] + v14[value >> 14]
                    elif INT64_MIN <= value <= INT64_MAX:
                        encoded_value = _TAG_INT + varint(value)
                    else:
                        raise _Unusual
                elif kind is float:
                    encoded_value = _TAG_FLOAT + _pack_double(value)
                else:
                    raise _Unusual
                push(heads[key][len(encoded_value)])  # KeyError: general path
                push(encoded_value)
        if raw_metadata is not None:
            if type(raw_metadata) is not dict:
                raise _Unusual
            pairs = self._pairs
            for key, value in raw_metadata.items():
                # Exact types first: a str subclass (e.g. a ``(str, Enum)`` member)
                # equals and hashes like a cached plain str but stringifies apart.
                if type(key) is not str or type(value) is not str:
                    raise _Unusual
                push(pairs[key, value])  # KeyError: general path
        offset = timestamp_ns - base
        if offset:
            push(_TAG_TIMESTAMP)
            if 0 < offset < 16384:
                push(v14[offset])
            elif 0 < offset < _LIMIT28:
                push(_LO14[offset & 0x3FFF])
                push(v14[offset >> 14])
            else:
                push(varint(offset))
        if correlation_id:
            if type(correlation_id) is not str:
                raise _Unusual
            push(_string_field(_TAG_CORRELATION, correlation_id))
        elif correlation_id is not None and type(correlation_id) is not str:
            raise _Unusual  # falsy but not "" (0, False): str() of it, as convert does
        if span_id:
            push(_TAG_SPAN_ID + _pack_fixed64(span_id))
        return b"".join(chunks)

    def _general(self, event: RawEvent, base: int) -> tuple[bytes, int, int]:
        """Any event: converts like :mod:`.convert` and fills the caches."""
        parts, raw_measurements, raw_metadata, correlation_id, timestamp_ns, span_id, stack = event
        names = self._names
        name = names.get(parts)
        if name is None:
            name = b"".join(_string_field(_TAG_PART, part) for part in parts)
            if len(names) >= _CACHE_LIMIT:
                names.clear()
            names[parts] = name
        chunks = [name]
        dropped = errors = 0
        if raw_measurements is not None:  # a non-mapping counts 1, even a falsy one
            dropped = self._measurements(raw_measurements, chunks)
        if raw_metadata is not None:
            errors = self._metadata(raw_metadata, chunks)
        offset = timestamp_ns - base
        if offset:
            chunks.append(_TAG_TIMESTAMP)
            chunks.append(varint(offset))
        if correlation_id is not None:
            if type(correlation_id) is not str:
                correlation_id = str(correlation_id)  # also when falsy, e.g. 0 -> "0"
            if correlation_id:
                chunks.append(_string_field(_TAG_CORRELATION, correlation_id))
        if span_id:
            chunks.append(_TAG_SPAN_ID + _pack_fixed64(span_id))
        for file, line, function in stack:
            chunks.append(_delimited(_TAG_FRAME, frame_message(file, line, function)))
        return b"".join(chunks), dropped, errors

    def _measurements(self, raw: Any, chunks: list[bytes]) -> int:
        if type(raw) is not dict and not isinstance(raw, Mapping):
            return 1
        heads = self._heads
        dropped = 0
        for key, value in raw.items():
            if type(key) is not str:
                dropped += 1
                continue
            kind = type(value)
            if kind is not int and kind is not float and kind is not str:
                value = coerce_measurement(value)
                if value is None:
                    dropped += 1
                    continue
                kind = type(value)
            if kind is int:
                if not INT64_MIN <= value <= INT64_MAX:
                    dropped += 1
                    continue
                encoded_value = _TAG_INT + varint(value)
            elif kind is float:
                encoded_value = _TAG_FLOAT + _pack_double(value)
            else:
                encoded_value = _string_field(_TAG_STRING, value)
            size = len(encoded_value)
            key_heads = heads.get(key)
            if key_heads is None and len(key) <= _CACHED_KEY_CHARS:
                key_heads = _measurement_heads(key)
                if len(heads) >= _CACHE_LIMIT:
                    heads.clear()
                heads[key] = key_heads
            if key_heads is not None and size < _HEAD_LENGTHS:
                chunks.append(key_heads[size])
            else:  # long keys and long string values: no precomputed head
                prefix = _string_field(_TAG_KEY, key) + _TAG_VALUE + varint(size)
                chunks.append(_TAG_MEASUREMENT + varint(len(prefix) + size) + prefix)
            chunks.append(encoded_value)
        return dropped

    def _metadata(self, raw: Any, chunks: list[bytes]) -> int:
        if type(raw) is not dict and not isinstance(raw, Mapping):
            return 1
        pairs = self._pairs
        errors = 0
        for key, value in raw.items():
            if value is None:
                continue
            cacheable = type(key) is str and type(value) is str
            entry = pairs.get((key, value)) if cacheable else None
            if entry is None:
                try:
                    entry = _metadata_entry(
                        key if type(key) is str else str(key),
                        value if type(value) is str else str(value),
                    )
                except Exception:
                    errors += 1
                    continue
                if (
                    cacheable
                    and len(value) <= _CACHED_VALUE_BYTES
                    and len(key) <= _CACHED_KEY_CHARS
                ):
                    if len(pairs) >= _CACHE_LIMIT:
                        pairs.clear()
                    pairs[(key, value)] = entry
            chunks.append(entry)
        return errors


def frame_message(file: str, line: int, function: str) -> bytes:
    """A ``TelemetryFrame`` message (empty fields left out, as protobuf does)."""
    out = b""
    if file:
        out += _string_field(_TAG_FRAME_FILE, file)
    if 0 < line < 1 << 32:
        out += _TAG_FRAME_LINE + varint(line)
    if function:
        out += _string_field(_TAG_FRAME_FUNCTION, function)
    return out


def _metadata_entry(key: str, value: str) -> bytes:
    return _delimited(
        _TAG_METADATA, _string_field(_TAG_KEY, key) + _string_field(_TAG_VALUE, value)
    )
