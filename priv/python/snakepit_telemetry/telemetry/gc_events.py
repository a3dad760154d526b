"""``python.gc.completed`` for every garbage collection, via ``gc.callbacks``.

The callback itself only timestamps and records: it can run in the middle of any
allocation, including inside the stream's own (non-reentrant) lock, so emitting
there could deadlock. Records go through a ``queue.SimpleQueue`` (its ``put`` is
reentrant by design) to a small daemon thread that emits them.
"""

from __future__ import annotations

import gc
import os
import queue
import threading
import time
from typing import Any

from ._internal import errors
from ._internal.core import emit

__all__ = [
    "GC_EVENT",
    "GC_EVENTS_ENV",
    "flush_gc_events",
    "gc_events_from_env",
    "gc_hook_installed",
    "install_gc_hook",
    "uninstall_gc_hook",
]

GC_EVENT = "python.gc.completed"
GC_EVENTS_ENV = "SNAKEPIT_TELEMETRY_GC_EVENTS"

_STOP = object()
_lock = threading.Lock()
# Each install gets its own queue, so a drainer from an earlier install that has
# not yet seen its stop marker can never steal records or markers from a new one.
_pending: queue.SimpleQueue[Any] | None = None
_drainer: threading.Thread | None = None
_started_ns = 0  # collections never overlap, so one slot is enough


def gc_events_from_env() -> bool:
    """``SNAKEPIT_TELEMETRY_GC_EVENTS`` as a bool ("true"/"1"/"yes"); default false."""
    return os.environ.get(GC_EVENTS_ENV, "").strip().lower() in ("true", "1", "yes")


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    global _started_ns
    try:
        if phase == "start":
            _started_ns = time.monotonic_ns()
        elif phase == "stop":
            started, _started_ns = _started_ns, 0
            duration = time.monotonic_ns() - started if started else 0
            pending = _pending
            if pending is None:
                return
            pending.put(
                (duration, info.get("generation"), info.get("collected"), info.get("uncollectable"))
            )
    except Exception:
        # An exception here would be reported as unraisable on every collection.
        errors.count()


def _drain(pending: queue.SimpleQueue[Any]) -> None:
    while True:
        item = pending.get()
        if item is _STOP:
            return
        if isinstance(item, threading.Event):
            item.set()  # a flush marker: everything recorded before it is emitted
            continue
        try:
            duration, generation, collected, uncollectable = item
            emit(
                GC_EVENT,
                {
                    "duration": duration,
                    "collected": int(collected or 0),
                    "uncollectable": int(uncollectable or 0),
                },
                {"generation": str(generation)},
            )
        except Exception:
            errors.count()


def install_gc_hook() -> None:
    """Start reporting collections; calling it again is a no-op."""
    global _drainer, _pending
    with _lock:
        if _drainer is not None:
            return
        _pending = queue.SimpleQueue()
        _drainer = threading.Thread(
            target=_drain, args=(_pending,), name="snakepit-telemetry-gc", daemon=True
        )
        _drainer.start()
        gc.callbacks.append(_on_gc)


def uninstall_gc_hook(timeout: float = 2.0) -> None:
    """Stop reporting collections, after emitting the ones already recorded."""
    global _drainer, _pending
    with _lock:
        drainer, _drainer = _drainer, None
        pending, _pending = _pending, None
        if drainer is None or pending is None:
            return
        while _on_gc in gc.callbacks:
            gc.callbacks.remove(_on_gc)
        pending.put(_STOP)
    if drainer is not threading.current_thread():
        drainer.join(timeout)


def flush_gc_events(timeout: float = 2.0) -> bool:
    """Wait until collections recorded so far are emitted; ``False`` on timeout.

    Lets a caller that just ran ``gc.collect()`` know its event is queued.
    """
    with _lock:
        pending = _pending
        if pending is None:
            return True
        done = threading.Event()
        pending.put(done)
    return done.wait(timeout)


def gc_hook_installed() -> bool:
    """Whether collections are being reported."""
    return _drainer is not None
