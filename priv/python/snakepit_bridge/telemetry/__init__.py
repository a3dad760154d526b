"""Public telemetry API for Snakepit Python workers.

``emit`` and ``span`` send events to a process-wide default :class:`TelemetryStream`
(created lazily, replaceable with :func:`set_stream`). Elixir pulls the events over
the ``BridgeService/StreamTelemetry`` gRPC call that :func:`add_to_server` registers.
Instrumentation must never break the instrumented code, so nothing here raises.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from .. import snakepit_bridge_pb2 as pb
from .stream import TelemetryStream

__all__ = [
    "SERVICE_NAME",
    "TelemetryStream",
    "add_to_server",
    "emit",
    "get_stream",
    "set_stream",
    "span",
    "stats",
]

SERVICE_NAME = "snakepit.bridge.BridgeService"
ERROR_MESSAGE_LIMIT = 1024

_default_stream: TelemetryStream | None = None
_default_lock = threading.Lock()


def get_stream() -> TelemetryStream:
    """Return the default stream, creating it on first use."""
    stream = _default_stream
    if stream is None:
        with _default_lock:
            stream = _default_stream
            if stream is None:
                stream = _set_default(TelemetryStream())
    return stream


def _set_default(stream: TelemetryStream) -> TelemetryStream:
    global _default_stream
    _default_stream = stream
    return stream


def set_stream(stream: TelemetryStream) -> None:
    """Replace the default stream that ``emit`` and ``span`` write to."""
    if not isinstance(stream, TelemetryStream):
        raise TypeError(f"expected a TelemetryStream, got {type(stream).__name__}")
    with _default_lock:
        _set_default(stream)


def stats() -> dict[str, int | bool]:
    """Counters of the default stream (see :meth:`TelemetryStream.stats`)."""
    return get_stream().stats()


def emit(
    event: str | Sequence[str],
    measurements: Mapping[str, Any] | None,
    metadata: Mapping[Any, Any] | None = None,
    correlation_id: str | None = None,
) -> None:
    """Queue one event on the default stream. Never raises; problems are counted."""
    try:  # noqa: SIM105 - plain try is cheaper than contextlib.suppress on the hot path
        get_stream().emit_event(event, measurements, metadata, correlation_id)
    except Exception:
        # Only reachable if the default stream cannot even be created; the caller
        # must still not see it.
        pass


def _suffixed(name: str | Sequence[str], suffix: str) -> str | tuple[Any, ...]:
    """``name`` plus one more event part, keeping the caller's representation."""
    if isinstance(name, str):
        return f"{name}.{suffix}"
    if isinstance(name, list | tuple):
        return (*name, suffix)
    return ""  # invalid: emit drops and counts it


def _safe_str(exc: BaseException) -> str:
    """``str(exc)`` truncated, tolerating exceptions whose ``__str__`` raises."""
    try:
        text = str(exc)
    except Exception:
        text = f"<unprintable {type(exc).__name__}>"
    return text[:ERROR_MESSAGE_LIMIT]


class span:  # noqa: N801 - used like a function: ``with telemetry.span(...)``
    """Context manager emitting ``<name>.start`` and ``<name>.stop``/``.exception``.

    Durations come from ``time.monotonic_ns`` so wall-clock jumps cannot make them
    negative; the user's exception always propagates unchanged. Sampling is
    decided once at enter (with the rate for ``<name>.start``) and shared by the
    stop/exception, so a sampled span is never delivered half; toggle, filters and
    a full queue still apply to each event separately. Both events go to the
    stream that was the default at enter.
    """

    __slots__ = ("_correlation_id", "_metadata", "_name", "_sampled", "_started", "_stream")

    def __init__(
        self,
        name: str | Sequence[str],
        metadata: Mapping[Any, Any] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self._name = name
        self._correlation_id = correlation_id
        self._started = 0
        self._stream: TelemetryStream | None = None
        self._sampled = True
        try:
            self._metadata: dict[Any, Any] = dict(metadata) if metadata else {}
        except Exception:
            self._metadata = {}

    def __enter__(self) -> span:
        try:
            stream = self._stream = get_stream()
            start = _suffixed(self._name, "start")
            self._sampled = stream.sample(start)
            stream.emit_event(
                start,
                {"system_time": time.time_ns()},
                self._metadata,
                self._correlation_id,
                self._sampled,
            )
        except Exception:
            pass
        self._started = time.monotonic_ns()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        duration = time.monotonic_ns() - self._started
        stream = self._stream
        try:
            if stream is None:
                return False  # enter failed before it could emit anything
            if exc_type is None:
                stream.emit_event(
                    _suffixed(self._name, "stop"),
                    {"duration": duration},
                    self._metadata,
                    self._correlation_id,
                    self._sampled,
                )
            else:
                meta = dict(self._metadata)
                meta["error_type"] = exc_type.__name__
                meta["error_message"] = _safe_str(exc) if exc is not None else ""
                stream.emit_event(
                    _suffixed(self._name, "exception"),
                    {"duration": duration},
                    meta,
                    self._correlation_id,
                    self._sampled,
                )
        except Exception:
            pass
        return False  # never swallow the user's exception


def _parse_control(data: bytes) -> pb.TelemetryControl:
    """Lenient deserializer so a malformed control cannot fail the whole call.

    gRPC aborts the call if a deserializer raises or returns ``None``, so garbage
    becomes an empty control, which the stream counts and ignores.
    """
    try:
        return pb.TelemetryControl.FromString(data)
    except Exception:
        return pb.TelemetryControl()


def add_to_server(server: grpc.Server, stream: TelemetryStream | None = None) -> TelemetryStream:
    """Register ``BridgeService/StreamTelemetry`` on an existing server.

    Uses a generic handler that only claims this one method, so Snakepit's other
    BridgeService methods can be registered on the same server side by side.
    Returns the stream that serves the call (the default one unless given).
    """
    target = stream if stream is not None else get_stream()
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "StreamTelemetry": grpc.stream_stream_rpc_method_handler(
                target.StreamTelemetry,
                request_deserializer=_parse_control,
                response_serializer=pb.TelemetryEvent.SerializeToString,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    return target
