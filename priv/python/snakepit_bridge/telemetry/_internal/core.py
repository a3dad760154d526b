"""emit, span and error reporting on the process-wide default stream.

Lives apart from the package ``__init__`` so the interceptor, samplers and GC hook
can import it without a cycle. Instrumentation must never break the instrumented
code, so nothing here raises into the caller (except the caller's own exceptions).
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from ..correlation import get_correlation_id
from ..stream import TelemetryStream

ERROR_MESSAGE_LIMIT = 1024
ERROR_EVENT = "python.error.occurred"
TOOL_SPAN = "tool.execution"

_F = TypeVar("_F", bound=Callable[..., Any])

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
    """Queue one event on the default stream. Never raises; problems are counted.

    Without an explicit ``correlation_id`` the context's current one is used
    (see :mod:`snakepit_bridge.telemetry.correlation`).
    """
    try:
        if correlation_id is None:
            correlation_id = get_correlation_id()
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


def safe_str(exc: BaseException) -> str:
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
    stream that was the default at enter, with the correlation ID in force at
    enter unless one was passed.
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
            if self._correlation_id is None:
                self._correlation_id = get_correlation_id()
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
        ended = time.monotonic_ns()
        if exc_type is None:
            self.stop(ended=ended)
        else:
            message = safe_str(exc) if exc is not None else ""
            self.fail(exc_type.__name__, message, ended=ended)
        return False  # never swallow the user's exception

    def stop(self, extra: Mapping[str, Any] | None = None, ended: int | None = None) -> None:
        """Emit ``<name>.stop``; for callers (like the interceptor) that cannot use ``with``."""
        self._end("stop", extra, ended)

    def fail(self, error_type: str, error_message: str, ended: int | None = None) -> None:
        """Emit ``<name>.exception`` with the given error fields."""
        self._end(
            "exception",
            {"error_type": error_type, "error_message": error_message[:ERROR_MESSAGE_LIMIT]},
            ended,
        )

    def _end(self, suffix: str, extra: Mapping[str, Any] | None, ended: int | None) -> None:
        duration = (time.monotonic_ns() if ended is None else ended) - self._started
        stream = self._stream
        if stream is None:
            return  # enter failed before it could emit anything
        try:
            meta = self._metadata
            if extra:
                meta = {**meta, **extra}
            stream.emit_event(
                _suffixed(self._name, suffix),
                {"duration": duration},
                meta,
                self._correlation_id,
                self._sampled,
            )
        except Exception:
            pass


def report_error(
    exc: BaseException,
    metadata: Mapping[str, Any] | None = None,
    correlation_id: str | None = None,
) -> None:
    """Emit ``python.error.occurred`` for an exception that escaped a tool.

    The exception's ``error_type``/``error_message`` win over same-named keys in
    ``metadata``, so they always describe ``exc``. Never raises.
    """
    try:
        meta: dict[str, Any] = dict(metadata) if metadata else {}
        meta["error_type"] = type(exc).__name__
        meta["error_message"] = safe_str(exc)
    except Exception:
        meta = {"error_type": type(exc).__name__, "error_message": ""}
    emit(ERROR_EVENT, {"system_time": time.time_ns()}, meta, correlation_id)


def tool(name: str) -> Callable[[_F], _F]:
    """Decorator: run a tool inside ``span("tool.execution", {"tool": name})``.

    An exception leaving the tool is also reported with :func:`report_error`
    (so it shows up even where spans are sampled or filtered out) and re-raised.
    Works for plain and ``async def`` functions.
    """

    def decorate(fn: _F) -> _F:
        meta = {"tool": name}
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                try:
                    with span(TOOL_SPAN, meta):
                        return await fn(*args, **kwargs)
                except Exception as exc:
                    report_error(exc, meta)
                    raise

            return cast(_F, run_async)

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                with span(TOOL_SPAN, meta):
                    return fn(*args, **kwargs)
            except Exception as exc:
                report_error(exc, meta)
                raise

        return cast(_F, run)

    return decorate
