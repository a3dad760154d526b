"""Cheap validation on the emit path and protobuf construction on the stream thread.

Emit runs inside user code, so it only normalises values into plain tuples/dicts;
the comparatively expensive protobuf objects are built later by the stream thread.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

from ... import snakepit_bridge_pb2 as pb

ERROR_MESSAGE_LIMIT = 1024
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

Scalar = int | float | str


class QueuedEvent(NamedTuple):
    """What sits in the queue: plain Python values, no protobuf yet."""

    parts: tuple[str, ...]
    measurements: dict[str, Scalar]
    metadata: dict[str, str]
    timestamp_ns: int
    correlation_id: str
    span_id: int = 0
    stacktrace: tuple[tuple[str, int, str], ...] = ()


NAME_CACHE: dict[str, tuple[str, ...] | None] = {}
NAME_CACHE_LIMIT = 4096


def event_parts(event: object) -> tuple[str, ...] | None:
    """Split a dotted name or validate a parts sequence; ``None`` means invalid.

    Dotted names repeat constantly, so their split is cached; the cache is simply
    reset when full so random names cannot grow it without bound.
    """
    if type(event) is str:
        cached = NAME_CACHE.get(event, NAME_CACHE)
        if cached is not NAME_CACHE:
            return cached  # type: ignore[return-value]
        parts = _validate(tuple(event.split(".")))
        if len(NAME_CACHE) >= NAME_CACHE_LIMIT:
            NAME_CACHE.clear()
        NAME_CACHE[event] = parts
        return parts
    if isinstance(event, list | tuple):
        return _validate(tuple(event))
    if isinstance(event, str):  # str subclass: normalise to a plain str
        return _validate(tuple(str.split(event, ".")))
    return None


def _validate(parts: tuple[object, ...]) -> tuple[str, ...] | None:
    if not parts:
        return None
    for part in parts:
        if type(part) is not str or not part:
            return None
    return parts  # type: ignore[return-value]


def measurements(raw: object) -> tuple[dict[str, Scalar], int]:
    """Keep the values the wire can carry; return them with the number dropped.

    bool becomes int (the wire has no bool), ints outside int64 are dropped rather
    than wrapped, and non-finite floats pass through because the Rust side owns
    the policy for them.
    """
    if raw is None:
        return {}, 0
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return {}, 1
    out: dict[str, Scalar] = {}
    dropped = 0
    for key, value in raw.items():
        kind = type(value)
        if type(key) is not str:
            dropped += 1
        elif kind is int or kind is float or kind is str:
            if kind is int and not INT64_MIN <= value <= INT64_MAX:
                dropped += 1
            else:
                out[key] = value
        else:
            converted = coerce_measurement(value)
            if converted is None:
                dropped += 1
            else:
                out[key] = converted
    return out, dropped


def coerce_measurement(value: Any) -> Scalar | None:
    """Slow path for subclasses and numeric ABCs (IntEnum, numpy scalars, ...)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Integral):
        as_int = int(value)
        return as_int if INT64_MIN <= as_int <= INT64_MAX else None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, str):
        return str.__str__(value)
    return None


def metadata(raw: object) -> tuple[dict[str, str], int]:
    """Stringify metadata; return it with the number of entries that failed to convert.

    ``None`` values are skipped silently: they mean "not set", not an error.
    """
    if raw is None:
        return {}, 0
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return {}, 1
    out: dict[str, str] = {}
    errors = 0
    for key, value in raw.items():
        if value is None:
            continue
        try:
            out[key if type(key) is str else str(key)] = value if type(value) is str else str(value)
        except Exception:
            errors += 1
    return out, errors


def from_raw(
    raw: tuple[tuple[str, ...], Any, Any, Any, int, int, tuple[tuple[str, int, str], ...]],
) -> tuple[QueuedEvent | None, int, int]:
    """Convert an event as emit queued it: ``(event, measurements_dropped, errors)``.

    The event is ``None`` (and ``errors`` 1) when the correlation id cannot be
    made a string; the counts are those of :func:`measurements` and :func:`metadata`.
    """
    parts, raw_measurements, raw_metadata, correlation_id, timestamp_ns, span_id, stack = raw
    try:
        values, dropped = measurements(raw_measurements)
        meta, errors = metadata(raw_metadata)
        if correlation_id is None:
            cid = ""
        elif type(correlation_id) is str:
            cid = correlation_id
        else:
            cid = str(correlation_id)
    except Exception:
        return None, 0, 1
    return QueuedEvent(parts, values, meta, timestamp_ns, cid, span_id, stack), dropped, errors


def to_proto(event: QueuedEvent) -> pb.TelemetryEvent:
    """Build the wire message; runs on the stream thread, never in emit."""
    msg = pb.TelemetryEvent(
        event_parts=event.parts,
        metadata=event.metadata,
        timestamp_ns=event.timestamp_ns,
        correlation_id=event.correlation_id,
        span_id=event.span_id,
    )
    for file, line, function in event.stacktrace:
        msg.stacktrace.add(file=file, line=line if 0 < line < 1 << 32 else 0, function=function)
    values = msg.measurements
    for key, value in event.measurements.items():
        if type(value) is int:
            values[key].int_value = value
        elif type(value) is float:
            values[key].float_value = value
        else:
            values[key].string_value = value
    return msg


def suffixed(name: object, suffix: str) -> str | tuple[Any, ...]:
    """``name`` plus one more event part, keeping the caller's representation."""
    if isinstance(name, str):
        return f"{name}.{suffix}"
    if isinstance(name, list | tuple):
        return (*name, suffix)
    return ""  # invalid: emit drops and counts it


def safe_str(exc: BaseException) -> str:
    """``str(exc)`` truncated, tolerating exceptions whose ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {type(exc).__name__}>"
    return text[:ERROR_MESSAGE_LIMIT]
