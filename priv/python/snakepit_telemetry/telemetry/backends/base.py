"""The :class:`Backend` contract plus the ``none`` and ``composite`` backends.

Backends see validated values only: the ``handle_*`` entry points (called by
``emit``/``span``) run the shared convert step and guard every call, so a backend
bug is counted in that backend's ``errors`` and never reaches user code.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar, NamedTuple

from .._internal import convert, errors, spans
from .._internal.convert import Scalar, safe_str

__all__ = ["NO_SPAN", "Backend", "CompositeBackend", "NoneBackend", "SpanFailure", "error_fields"]


class SpanFailure(Exception):
    """A span failure known only by type name and message (e.g. a gRPC status).

    Lets ``span.fail(error_type, message)`` use the same ``span_end`` path as a real
    exception without inventing an exception class per error type.
    """

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.message = message


def error_fields(error: BaseException) -> dict[str, str]:
    """``error_type``/``error_message`` metadata describing ``error``."""
    if isinstance(error, SpanFailure):
        return {
            "error_type": error.error_type,
            "error_message": error.message[: convert.ERROR_MESSAGE_LIMIT],
        }
    return {"error_type": type(error).__name__, "error_message": safe_str(error)}


class _NoSpan:
    """Token for a span whose start failed: its end is skipped, not counted twice."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_SPAN"


NO_SPAN: Any = _NoSpan()


class _DefaultSpan(NamedTuple):
    parts: tuple[str, ...]
    metadata: dict[str, str]
    correlation_id: str
    span_id: int


def _correlation(value: object) -> str:
    if value is None:
        return ""
    return value if type(value) is str else str(value)


class Backend:
    """Where telemetry goes. Subclasses override what they need; all defaults are no-ops.

    Spans default to ``<name>.start`` / ``.stop`` / ``.exception`` events sent
    through :meth:`emit`, so an event-only backend gets spans for free.
    """

    name: ClassVar[str] = "backend"

    def __init__(self) -> None:
        self._counts_lock = threading.Lock()
        self._counts: dict[str, int] = {"emitted": 0, "dropped": 0, "errors": 0}

    # ----------------------------------------------------------- override these

    def emit(
        self,
        parts: tuple[str, ...],
        measurements: dict[str, Scalar],
        metadata: dict[str, str],
        timestamp_ns: int,
        correlation_id: str,
    ) -> None:
        """Deliver one validated event; must not block the caller for long."""

    def emit_span_event(
        self,
        parts: tuple[str, ...],
        measurements: dict[str, Scalar],
        metadata: dict[str, str],
        timestamp_ns: int,
        correlation_id: str,
        span_id: int,
        stacktrace: tuple[spans.Frame, ...],
    ) -> None:
        """Deliver one event of a span (the default spans' path).

        ``span_id`` is the same on a span's start, stop and exception events;
        ``stacktrace`` is the bounded traceback of an exception event, innermost
        frame first (see :mod:`.._internal.spans`), else empty. By default both are
        left out and the event goes to :meth:`emit`; a backend that can carry them
        (``stderr``) overrides this.
        """
        self.emit(parts, measurements, metadata, timestamp_ns, correlation_id)

    def span_start(self, name: str, metadata: dict[str, str], correlation_id: str) -> object:
        """Begin a span; the returned token is handed back to :meth:`span_end`."""
        parts = tuple(name.split("."))
        token = _DefaultSpan(parts, metadata, correlation_id, spans.new_span_id())
        now = time.time_ns()
        self.emit_span_event(
            (*parts, "start"),
            {"system_time": now},
            metadata,
            now,
            correlation_id,
            token.span_id,
            (),
        )
        return token

    def span_end(
        self,
        token: object,
        duration_ns: int,
        error: BaseException | None,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        """End a span: ``.stop``, or ``.exception`` with error fields when ``error``."""
        if not isinstance(token, _DefaultSpan):
            return
        meta = {**token.metadata, **extra} if extra else token.metadata
        suffix = "stop"
        stack: tuple[spans.Frame, ...] = ()
        if error is not None:
            suffix = "exception"
            meta = {**meta, **error_fields(error)}
            stack = spans.frames(error)
        self.emit_span_event(
            (*token.parts, suffix),
            {"duration": duration_ns},
            meta,
            time.time_ns(),
            token.correlation_id,
            token.span_id,
            stack,
        )

    def close(self) -> None:
        """Flush what is pending and release resources (after a best-effort wait)."""

    def stats(self) -> dict[str, Any]:
        """Counters of this backend; always includes ``dropped`` and ``errors``."""
        with self._counts_lock:
            return dict(self._counts)

    # ------------------------------------------------- entry points used by core

    def count(self, key: str, amount: int = 1) -> None:
        """Thread-safe counter increment (unknown keys start at zero).

        ``errors`` also counts in the process-wide internal errors (see
        :mod:`.._internal.errors`), which stats reports carry to Elixir.
        """
        with self._counts_lock:
            self._counts[key] = self._counts.get(key, 0) + amount
        if key == "errors":
            errors.count(amount)

    def handle_emit(
        self, event: object, measurements: object, metadata: object, correlation_id: object
    ) -> None:
        """Validate the caller's raw values, then :meth:`emit`. Never raises."""
        try:
            timestamp_ns = time.time_ns()
            parts = convert.event_parts(event)
            if parts is None:
                self.count("dropped")
                return
            values, _ = convert.measurements(measurements)
            meta, _ = convert.metadata(metadata)
            self.count("emitted")
            self.emit(parts, values, meta, timestamp_ns, _correlation(correlation_id))
        except Exception:
            self.count("errors")

    def handle_span_start(self, name: object, metadata: object, correlation_id: object) -> object:
        """Validate and :meth:`span_start`; :data:`NO_SPAN` when that fails. Never raises."""
        try:
            parts = convert.event_parts(name)
            if parts is None:
                self.count("dropped")
                return NO_SPAN
            meta, _ = convert.metadata(metadata)
            return self.span_start(".".join(parts), meta, _correlation(correlation_id))
        except Exception:
            self.count("errors")
            return NO_SPAN

    def handle_span_end(
        self,
        token: object,
        duration_ns: int,
        error: BaseException | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        """Validate ``extra`` and :meth:`span_end`. Never raises."""
        if token is NO_SPAN:
            return
        try:
            meta = convert.metadata(extra)[0] if extra else None
            self.span_end(token, duration_ns, error, meta)
        except Exception:
            self.count("errors")

    def describe(self) -> dict[str, dict[str, Any]]:
        """``{name: stats}`` for this backend (a composite lists each member)."""
        try:
            return {self.name: self.stats()}
        except Exception:
            self.count("errors")
            return {self.name: {"errors": -1}}


class NoneBackend(Backend):
    """Discards everything, as cheaply as possible."""

    name = "none"

    def handle_emit(
        self, event: object, measurements: object, metadata: object, correlation_id: object
    ) -> None:
        return

    def handle_span_start(self, name: object, metadata: object, correlation_id: object) -> object:
        return NO_SPAN


class CompositeBackend(Backend):
    """Fans every call out to several backends; one failing never stops the others."""

    name = "composite"

    def __init__(self, backends: Iterable[Backend]) -> None:
        super().__init__()
        self.backends: tuple[Backend, ...] = tuple(backends)

    def handle_emit(
        self, event: object, measurements: object, metadata: object, correlation_id: object
    ) -> None:
        for backend in self.backends:
            try:
                backend.handle_emit(event, measurements, metadata, correlation_id)
            except Exception:  # only a backend overriding handle_emit can get here
                backend.count("errors")

    def handle_span_start(self, name: object, metadata: object, correlation_id: object) -> object:
        tokens: list[object] = []
        for backend in self.backends:
            try:
                tokens.append(backend.handle_span_start(name, metadata, correlation_id))
            except Exception:
                backend.count("errors")
                tokens.append(NO_SPAN)
        return tuple(tokens)

    def handle_span_end(
        self,
        token: object,
        duration_ns: int,
        error: BaseException | None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(token, tuple):
            return
        for backend, sub in zip(self.backends, token, strict=False):
            try:
                backend.handle_span_end(sub, duration_ns, error, extra)
            except Exception:
                backend.count("errors")

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception:
                backend.count("errors")

    def stats(self) -> dict[str, Any]:
        """Sums of ``dropped``/``errors`` over the members (see :meth:`describe`)."""
        total = {"dropped": 0, "errors": 0}
        for stats in self.describe().values():
            for key in total:
                value = stats.get(key, 0)
                total[key] += value if isinstance(value, int) else 0
        return total

    def describe(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for backend in self.backends:
            out.update(backend.describe())
        return out
