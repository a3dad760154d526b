"""Process-wide count of internal failures that no stream counted.

Telemetry never raises into the instrumented code, so every failure it
swallows is counted instead. A failure inside a stream (converting, encoding,
sending) is counted in that stream's ``internal_errors``; the ones here happen
where no stream is involved, or before one exists: ``emit`` or ``span`` failing
to reach a backend, a backend's own failures (counted as its ``errors`` too),
the interceptor, the samplers and the GC hook. Every stream adds this count to
the ``internal_errors`` of its ``telemetry.python.stats`` reports, so it reaches
Elixir with the stream's own.

With the native implementation the count lives in the extension (an atomic its
stats events read without the GIL): :func:`count` and :func:`total` are the
extension's ``count_process_errors`` and ``process_errors``.
"""

from __future__ import annotations

import os
import threading

from . import implementation

_lock = threading.Lock()
_count = 0


def count(amount: int = 1) -> None:
    """Count ``amount`` swallowed failures. Never raises."""
    global _count
    with _lock:
        _count += amount


def total() -> int:
    """Failures counted so far in this process."""
    return _count


_native = implementation.native()
if _native is not None:
    count = _native.count_process_errors  # noqa: F811 - the extension's count wins
    total = _native.process_errors  # noqa: F811


def _reset_for_tests() -> None:
    global _count
    with _lock:
        _count = 0
    if _native is not None:
        _native.reset_process_errors()


def _start_over_in_child() -> None:
    """A forked child counts its own failures (its streams start over too),
    with a fresh lock: the parent's may have been held by another thread."""
    global _lock, _count
    _lock = threading.Lock()
    _count = 0
    if _native is not None:
        _native.reset_process_errors()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_start_over_in_child)
