"""The process-wide default :class:`TelemetryStream`.

A leaf under both the core API (:mod:`.core`: ``emit``, ``span``,
``set_stream``) and the backends: the ``grpc`` and ``statsd`` backends read the
default stream here, and the core learns of a new default through
:func:`on_replace`. So the core imports the backends and no backend imports the
core: the package's import graph has no cycle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..stream import TelemetryStream

_stream: TelemetryStream | None = None
_lock = threading.RLock()
_listeners: list[Callable[[], None]] = []


def current() -> TelemetryStream | None:
    """The default stream without creating one (``None`` until first needed)."""
    return _stream


def get_stream() -> TelemetryStream:
    """Return the default stream, creating it on first use."""
    stream = _stream
    if stream is None:
        with _lock:
            stream = _stream
            if stream is None:
                stream = replace(TelemetryStream())
    return stream


def replace(stream: TelemetryStream) -> TelemetryStream:
    """Make ``stream`` the default and run the :func:`on_replace` listeners (under the lock)."""
    global _stream
    with _lock:
        _stream = stream
        for listener in _listeners:
            listener()
    return stream


def on_replace(listener: Callable[[], None]) -> None:
    """Call ``listener`` after every change of the default stream; it must not raise."""
    _listeners.append(listener)
