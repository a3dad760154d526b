"""emit, span and error reporting on the process-wide default stream.

Lives apart from the package ``__init__`` so the interceptor, samplers and GC hook
can import it without a cycle. Instrumentation must never break the instrumented
code, so nothing here raises into the caller (except the caller's own exceptions).

With the native implementation (:mod:`.implementation`), ``emit`` *is* the
extension's ``_native.emit``: while the current backend is the plain ``grpc``
one writing to a :class:`NativeTelemetryStream` (the one installed with
``_native.set_default``, kept up to date by :func:`_refresh_fast`), it converts
and queues the event in Rust; otherwise it calls the pure ``emit`` defined below
(kept as ``_python_emit``), which goes through the backends as with the python
implementation.
Spans on that stream go straight to the extension too (see ``span.__enter__``).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar, cast

from .. import backends
from ..correlation import _current as _correlation_var
from ..correlation import get_correlation_id
from ..native_stream import AnyTelemetryStream, NativeTelemetryStream
from ..stream import _FILLS_A_BATCH, TelemetryStream
from . import defaults, errors, implementation, spans
from .convert import ERROR_MESSAGE_LIMIT as ERROR_MESSAGE_LIMIT
from .convert import NAME_CACHE, safe_str, suffixed
from .convert import event_parts as convert_event_parts

ERROR_EVENT = "python.error.occurred"
TOOL_SPAN = "tool.execution"

_F = TypeVar("_F", bound=Callable[..., Any])

# The stream the current backend writes to when that backend is plain ``grpc``:
# emit then queues directly, without going through the backend object.
_fast_stream: TelemetryStream | None = None
# Likewise for a native stream: its extension object, which spans write to directly.
_native_stream: Any = None
_time_ns = time.time_ns
_monotonic_ns = time.monotonic_ns
_current_correlation_id = _correlation_var.get  # get_correlation_id minus one call
# The extension module when the native implementation runs, else None.
_native = implementation.native()
if _native is not None:
    spans.use_native(_native)


def _refresh_fast() -> None:
    """Recompute ``_fast_stream``/``_native_stream`` and the extension's default
    stream; called under the backends' selection lock.

    Never creates the default stream: until one exists, emits take the full path
    (which creates it, and so comes back here).
    """
    global _fast_stream, _native_stream
    backend = backends.current()
    stream: AnyTelemetryStream | None = None
    if type(backend) is backends.GrpcBackend:
        stream = backend.fixed_stream or defaults.current()
    if isinstance(stream, NativeTelemetryStream):
        _fast_stream, _native_stream = None, stream._native
    else:
        _fast_stream, _native_stream = stream, None
    if _native is not None:
        _native.set_default(_native_stream)


backends.on_change(_refresh_fast)
# A new default stream (set here or created on first use by a backend) is a
# change for the fast path too.
defaults.on_replace(backends.notify_change)
get_stream = defaults.get_stream


def set_stream(stream: AnyTelemetryStream) -> None:
    """Replace the default stream that the ``grpc`` backend writes to.

    ``stream`` is a :class:`TelemetryStream` or a :class:`NativeTelemetryStream`
    (see :func:`new_stream`). Choosing a stream is choosing the gRPC path, so
    unless a backend was picked explicitly the default backend becomes ``grpc``.
    """
    if not isinstance(stream, TelemetryStream | NativeTelemetryStream):
        raise TypeError(f"expected a TelemetryStream, got {type(stream).__name__}")
    defaults.replace(stream)
    backends.mark_served()


def stats() -> dict[str, int | bool]:
    """Counters of the default stream (see :meth:`TelemetryStream.stats`)."""
    return get_stream().stats()


def emit(
    event: str | Sequence[str],
    measurements: Mapping[str, Any] | None,
    metadata: Mapping[Any, Any] | None = None,
    correlation_id: str | None = None,
) -> None:
    """Send one event to the current backend. Never raises; problems are counted.

    Without an explicit ``correlation_id`` the context's current one is used
    (see :mod:`snakepit_telemetry.telemetry.correlation`). With the native
    implementation the event is converted during the call (the caller's
    mappings are not kept); with the python one the ``grpc`` backend queues
    them as they are and reads them later, on the stream thread.
    """
    try:
        # The grpc backend's common case, inlined from TelemetryStream.emit_event
        # because every call layer costs a measurable share of the emit.
        stream = _fast_stream
        if stream is not None and type(event) is str:
            parts = NAME_CACHE.get(event)
            queue = stream._queue
            queued = len(queue)
            if parts is not None and queued < stream._fast_cap:
                if correlation_id is None:
                    correlation_id = _current_correlation_id()
                queue.append((parts, measurements, metadata, correlation_id, _time_ns(), 0, ()))
                if stream._idle or queued == _FILLS_A_BATCH:
                    stream.wake()
                return
        if correlation_id is None:
            correlation_id = get_correlation_id()
        backends.get_backend().handle_emit(event, measurements, metadata, correlation_id)
    except Exception:
        # Only reachable if the backend cannot even be created; the caller
        # must still not see it, and the failure is counted.
        errors.count()


# The pure emit, which the native one falls back to.
_python_emit = emit
if _native is not None:
    _native.configure(_correlation_var, _python_emit)
    emit = _native.emit  # noqa: F811 - with the extension, emit is its function

_suffixed = suffixed


class _SpanMethods:
    """What both implementations' ``span`` share: the paths other than the native
    stream's common case (which the native ``span`` runs in the extension)."""

    __slots__ = ()
    _name: str | Sequence[str]
    _metadata: dict[Any, Any]
    _correlation_id: str | None
    _started: int
    _span_id: int
    _backend: backends.Backend | None
    _token: object

    def _enter_slow(self) -> None:
        """Start the span on the current backend (or the pure fast path)."""
        try:
            stream = _fast_stream
            if stream is not None and stream._fast_cap:
                names = _span_names(self._name)
                if names is not None:
                    self._enter_fast(stream, names)
                    self._started = time.monotonic_ns()
                    return
            if self._correlation_id is None:
                self._correlation_id = get_correlation_id()
            backend = self._backend = backends.get_backend()
            self._token = backend.handle_span_start(
                self._name, self._metadata, self._correlation_id
            )
        except Exception:
            errors.count()
        self._started = time.monotonic_ns()

    def _exit_slow(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        ended: int,
    ) -> None:
        if exc_type is None:
            self._end(None, None, ended)
        else:
            error = exc if exc is not None else backends.SpanFailure(exc_type.__name__, "")
            self._end(error, None, ended)

    def stop(self, extra: Mapping[str, Any] | None = None, ended: int | None = None) -> None:
        """End the span successfully; for callers (the interceptor) that cannot use ``with``."""
        self._end(None, extra, ended)

    def fail(
        self,
        error_type: str,
        error_message: str,
        ended: int | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        """End the span as failed with the given error fields.

        ``traceback`` (e.g. a caught exception's ``__traceback__``) becomes the
        exception event's stacktrace; without one it has none.
        """
        failure = backends.SpanFailure(error_type, error_message)
        if traceback is not None:
            failure = failure.with_traceback(traceback)
        self._end(failure, None, ended)

    def _enter_fast(self, stream: TelemetryStream, names: _SpanNames) -> None:
        """The grpc backend's common case: queue ``<name>.start`` directly.

        Only taken while the stream needs no sampling decision, so the span is
        whole by construction; the end takes the same path or, if controls
        changed meanwhile, the stream's full path with the span counted as sampled.
        """
        if self._correlation_id is None:
            self._correlation_id = _current_correlation_id()
        self._backend = _FAST_SPAN
        self._token = (stream, names)
        self._span_id = span_id = spans.new_span_id()
        now = _time_ns()
        event = (
            names[0],
            {"system_time": now},
            self._metadata,
            self._correlation_id,
            now,
            span_id,
            (),
        )
        _queue_fast(stream, event)

    def _end_native(
        self, duration: int, error: BaseException | None, extra: Mapping[str, Any] | None
    ) -> None:
        meta = self._metadata
        stack: tuple[spans.Frame, ...] = ()
        if error is not None:
            extra = backends.error_fields(error)
            stack = spans.frames(error)
        if extra:
            meta = {**meta, **extra}
        self._native_end(error is not None, duration, meta, stack)  # type: ignore[attr-defined]

    def _end(
        self, error: BaseException | None, extra: Mapping[str, Any] | None, ended: int | None
    ) -> None:
        duration = (time.monotonic_ns() if ended is None else ended) - self._started
        try:
            if self._native_active:
                self._end_native(duration, error, extra)
                return
            backend = self._backend
            if backend is None:
                return  # enter failed before it could start anything
            if backend is _FAST_SPAN:
                self._end_fast(duration, error, extra)
            else:
                backend.handle_span_end(self._token, duration, error, extra)
        except Exception:
            errors.count()

    def _end_fast(
        self, duration: int, error: BaseException | None, extra: Mapping[str, Any] | None
    ) -> None:
        # No typing.cast here: building its generic alias costs a share of the span.
        stream, names = self._token  # type: ignore[misc]
        meta = self._metadata
        stack: tuple[spans.Frame, ...] = ()
        if error is not None:
            parts = names[2]
            extra = backends.error_fields(error)
            stack = spans.frames(error)
        else:
            parts = names[1]
        if extra:
            meta = {**meta, **extra}
        event = (
            parts,
            {"duration": duration},
            meta,
            self._correlation_id,
            _time_ns(),
            self._span_id,
            stack,
        )
        _queue_fast(stream, event)


_SPAN_DOC = """Context manager for a span on the current backend (see ``Backend.span_start``).

    By default (events backends) it emits ``<name>.start`` and
    ``<name>.stop``/``.exception``. Durations come from ``time.monotonic_ns`` so
    wall-clock jumps cannot make them negative; the user's exception always
    propagates unchanged. Both ends go to the backend that was current at enter,
    with the correlation ID in force at enter unless one was passed. On the grpc
    backend sampling is decided once at enter (with the rate for ``<name>.start``)
    and shared by the stop/exception, so a sampled span is never delivered half.

    The three events carry the span's id (see :mod:`._internal.spans`), which
    Elixir gives handlers as ``telemetry_span_context``; an exception event also
    carries the traceback (bounded, innermost frames first).

    With the native implementation, construction, ``__enter__`` and a successful
    ``__exit__`` on the native default stream run in the extension
    (``_native.SpanBase``), without a Python frame.
    """


class span(_SpanMethods):  # noqa: N801 - used like a function: ``with telemetry.span(...)``
    __doc__ = _SPAN_DOC
    __slots__ = (
        "_backend",
        "_correlation_id",
        "_metadata",
        "_name",
        "_span_id",
        "_started",
        "_token",
    )

    def __init__(
        self,
        name: str | Sequence[str],
        metadata: Mapping[Any, Any] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        self._name = name
        self._correlation_id = correlation_id
        self._started = 0
        self._span_id = 0
        self._backend = None
        self._token = backends.NO_SPAN
        try:
            self._metadata = dict(metadata) if metadata else {}
        except Exception:
            self._metadata = {}
            errors.count()

    # Never started in the extension (the native span's base class answers
    # for itself); a class attribute, so _end reads it without a failed lookup.
    _native_active = False

    def __enter__(self) -> span:
        # The pure fast path inlined (a call layer is a measurable share of a span).
        try:
            stream = _fast_stream
            if stream is not None and stream._fast_cap:
                names = _span_names(self._name)
                if names is not None:
                    self._enter_fast(stream, names)
                    self._started = time.monotonic_ns()
                    return self
        except Exception:
            errors.count()
            self._started = time.monotonic_ns()
            return self
        self._enter_slow()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        ended = time.monotonic_ns()
        if exc_type is None:
            self._end(None, None, ended)
        else:
            self._exit_slow(exc_type, exc, ended)
        return False  # never swallow the user's exception


if _native is not None:

    class span(_SpanMethods, _native.SpanBase):  # type: ignore[no-redef]  # noqa: N801
        __doc__ = _SPAN_DOC
        __slots__ = ()


# A span name's (start, stop, exception) event parts.
_SpanNames = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]
_span_name_cache: dict[object, _SpanNames | None] = {}
_SPAN_NAME_CACHE_LIMIT = 4096
# Marks a span started by span._enter_fast (in place of a backend).
_FAST_SPAN: Any = object()
# Marks a span started on the native stream in the extension (its ``_backend``).
_NATIVE_SPAN: Any = _native.NATIVE_SPAN if _native is not None else object()
_MISSING: Any = object()


def _span_names(name: object) -> _SpanNames | None:
    """Event parts of a dotted span name's three events (cached); ``None`` if not dotted-valid."""
    if type(name) is not str:
        return None
    names = _span_name_cache.get(name, _MISSING)
    if names is not _MISSING:
        return names
    parts = NAME_CACHE.get(name) or convert_event_parts(name)
    names = None if parts is None else ((*parts, "start"), (*parts, "stop"), (*parts, "exception"))
    if len(_span_name_cache) >= _SPAN_NAME_CACHE_LIMIT:
        _span_name_cache.clear()
    _span_name_cache[name] = names
    return names


def _queue_fast(stream: TelemetryStream, event: tuple[Any, ...]) -> None:
    """Append a ready event, or hand it to the stream's full path (which counts a drop)."""
    queue = stream._queue
    queued = len(queue)
    if queued < stream._fast_cap:
        queue.append(event)
        if stream._idle or queued == _FILLS_A_BATCH:
            stream.wake()
    else:
        parts, measurements, metadata, correlation_id, _, span_id, stack = event
        stream.emit_event(parts, measurements, metadata, correlation_id, True, span_id, stack)


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
        errors.count()
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
