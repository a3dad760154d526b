"""Pluggable telemetry backends: where ``emit`` and ``span`` send their events.

Pick one (or several) to fit the infrastructure::

    SNAKEPIT_TELEMETRY_BACKEND=stderr,statsd      # environment, or in code:
    telemetry.set_backend("otel")                 # a name, list, or Backend instance

====================  ==========  ============================================================
name                  extra       what it does
====================  ==========  ============================================================
``grpc``                          queue for Elixir's ``StreamTelemetry`` call (controls,
                                  sampling, stats reports); the default once served
``stderr``                        ``SNAKEPIT_TELEMETRY_EVENT {json}`` lines on stderr;
                                  the default otherwise
``statsd``                        DogStatsD over UDP (timers, gauges, counters, tags)
``otel``              ``otel``    OpenTelemetry spans and span events
``none``                          discard everything
``a,b``                           composite: every event to each listed backend
====================  ==========  ============================================================

Environment (read when first needed; bad values fall back, logged at debug):

==========================================  ===============  ===================================
variable                                    default          meaning
==========================================  ===============  ===================================
``SNAKEPIT_TELEMETRY_BACKEND``              grpc / stderr    name or comma list (see above);
                                                             ``grpc`` once ``add_to_server`` or
                                                             ``set_stream`` was called
``SNAKEPIT_TELEMETRY_STDERR_QUEUE``         1024             stderr lines waiting to be written;
                                                             beyond it events are dropped
``SNAKEPIT_TELEMETRY_STATSD_HOST``          127.0.0.1        statsd host (resolved once)
``SNAKEPIT_TELEMETRY_STATSD_PORT``          8125             statsd UDP port
``SNAKEPIT_TELEMETRY_STATSD_PREFIX``        snakepit         metric name prefix
==========================================  ===============  ===================================

The ``grpc`` backend keeps its own ``SNAKEPIT_TELEMETRY_*`` settings (see
:mod:`snakepit_telemetry.telemetry.stream`); ``statsd`` samples with the rate those
settings (and Elixir's controls) give. Unknown names are skipped and counted in
:func:`selection_stats`; if nothing valid is left the default applies. ``otel``
without its packages logs one warning and becomes ``none`` (counted too).

Every backend counts its own ``dropped`` and ``errors`` (:meth:`Backend.stats`);
a failing backend never raises into user code nor stops the others in a composite.

A backend subclass implements :meth:`Backend.emit`; its spans then arrive as
``<name>.start``/``.stop``/``.exception`` events. The span id and traceback of
those events go to :meth:`Backend.emit_span_event`, which drops them and calls
``emit`` unless overridden (``stderr`` writes them on its lines).
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from .._internal import errors
from .base import NO_SPAN, Backend, CompositeBackend, NoneBackend, SpanFailure, error_fields
from .grpc import GrpcBackend
from .statsd import StatsdBackend
from .stderr import LINE_PREFIX, StderrBackend

__all__ = [
    "BACKEND_ENV",
    "BACKEND_NAMES",
    "LINE_PREFIX",
    "NO_SPAN",
    "Backend",
    "CompositeBackend",
    "GrpcBackend",
    "NoneBackend",
    "SpanFailure",
    "StatsdBackend",
    "StderrBackend",
    "backend_stats",
    "create_backend",
    "error_fields",
    "get_backend",
    "mark_served",
    "selection_stats",
    "set_backend",
]

log = logging.getLogger(__name__)

BACKEND_ENV = "SNAKEPIT_TELEMETRY_BACKEND"
BACKEND_NAMES = ("grpc", "stderr", "otel", "statsd", "none")

BackendSpec = Backend | str | Sequence["str | Backend"]

_lock = threading.RLock()
_current: Backend | None = None
_auto = False  # the current backend came from the default rule, not a choice
_served = False
_otel_warned = False
_selection = {"unknown_names": 0, "unavailable": 0}
# Called (under _lock) whenever the current backend changes; the core emit path
# uses this to cache where the grpc backend writes.
_listeners: list[Callable[[], None]] = []


def on_change(listener: Callable[[], None]) -> None:
    """Call ``listener`` after every change of the current backend."""
    _listeners.append(listener)


def notify_change() -> None:
    """Run the change listeners (under the selection lock), e.g. when the stream
    that a default ``grpc`` backend writes to was replaced."""
    with _lock:
        _changed()


def current() -> Backend | None:
    """The current backend without resolving one (``None`` until first needed)."""
    return _current


def _changed() -> None:
    for listener in _listeners:
        try:
            listener()
        except Exception:
            errors.count()
            log.debug("telemetry backend listener failed", exc_info=True)


def _build_one(name: str) -> Backend | None:
    global _otel_warned
    if name == "grpc":
        return GrpcBackend()
    if name == "stderr":
        return StderrBackend()
    if name == "statsd":
        return StatsdBackend()
    if name == "none":
        return NoneBackend()
    if name == "otel":
        try:
            from .otel import OtelBackend

            return OtelBackend()
        except ImportError as exc:
            _selection["unavailable"] += 1
            if not _otel_warned:
                _otel_warned = True
                log.warning("otel telemetry backend unavailable (%s); using none", exc)
            return NoneBackend()
    _selection["unknown_names"] += 1
    log.debug("unknown telemetry backend %r ignored", name)
    return None


def create_backend(spec: BackendSpec) -> Backend | None:
    """Build a backend from a name, ``"a,b"`` list, sequence or instance.

    Returns ``None`` when nothing valid was named; never raises.
    """
    if isinstance(spec, Backend):
        return spec
    items: list[str | Backend] = []
    if isinstance(spec, str):
        items.extend(spec.split(","))
    elif isinstance(spec, Sequence):
        for item in spec:
            items.extend(item.split(",") if isinstance(item, str) else [item])
    else:
        _selection["unknown_names"] += 1
        log.debug("telemetry backend spec %r ignored", spec)
        return None
    built: list[Backend] = []
    seen: set[str] = set()
    with _lock:
        for item in items:
            if isinstance(item, Backend):
                built.append(item)
                continue
            if not isinstance(item, str):
                _selection["unknown_names"] += 1
                continue
            name = item.strip().lower()
            if not name or name in seen:
                continue
            seen.add(name)
            backend = _build_one(name)
            if backend is not None:
                built.append(backend)
    if not built:
        return None
    return built[0] if len(built) == 1 else CompositeBackend(built)


def _default() -> Backend:
    return GrpcBackend() if _served else StderrBackend()


def _resolve() -> Backend:
    """The env choice if it names anything valid, else the default rule."""
    global _current, _auto
    raw = os.environ.get(BACKEND_ENV, "")
    backend = create_backend(raw) if raw.strip() else None
    _auto = backend is None
    _current = backend if backend is not None else _default()
    _changed()
    return _current


def get_backend() -> Backend:
    """The backend ``emit``/``span`` use now (resolved on first need)."""
    backend = _current
    if backend is None:
        with _lock:
            backend = _current if _current is not None else _resolve()
    return backend


def set_backend(spec: BackendSpec | None) -> Backend:
    """Switch backends; ``None`` re-reads the env/default on next use. Never raises.

    An unknown name falls back to the default. The previous backend is closed
    (flushed) unless it is the caller's own instance being kept in the new one.
    """
    global _current, _auto
    new = create_backend(spec) if spec is not None else None
    with _lock:
        old = _current
        if new is None:
            _current = None
            new = _resolve() if spec is not None else None
            if spec is None:
                _changed()
        else:
            _current, _auto = new, False
        _changed()
    if old is not None and old is not new and not _contains(new, old):
        _close_quietly(old)
    return new if new is not None else get_backend()


def _contains(outer: Backend | None, inner: Backend) -> bool:
    return isinstance(outer, CompositeBackend) and inner in outer.backends


def _close_quietly(backend: Backend) -> None:
    try:
        backend.close()
    except Exception:
        backend.count("errors")


def mark_served() -> None:
    """The process serves the gRPC stream: the default becomes ``grpc`` from now on."""
    global _served, _current
    with _lock:
        _served = True
        old = _current
        if old is None or not _auto or isinstance(old, GrpcBackend):
            return
        _current = GrpcBackend()
        _changed()
    _close_quietly(old)


def backend_stats() -> dict[str, dict[str, Any]]:
    """``{name: stats}`` for each backend in use (one per composite member)."""
    return get_backend().describe()


def selection_stats() -> dict[str, int]:
    """Names that could not be honoured: ``unknown_names`` and ``unavailable`` (otel)."""
    with _lock:
        return dict(_selection)


@atexit.register
def _flush_at_exit() -> None:
    """Give the stderr writer (at most a second) to write what is still queued."""
    backend = _current
    if backend is not None:
        _close_quietly(backend)


def _reset_for_tests() -> None:
    """Forget the choice and the served flag (tests only)."""
    global _current, _auto, _served
    with _lock:
        old, _current, _auto, _served = _current, None, False, False
        _selection.update(unknown_names=0, unavailable=0)
        _changed()
    if old is not None:
        _close_quietly(old)
    errors._reset_for_tests()
