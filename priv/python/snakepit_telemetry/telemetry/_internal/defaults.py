"""The process-wide default stream: a :class:`NativeTelemetryStream` with the
native implementation (see :mod:`.implementation`), else a :class:`TelemetryStream`.

A leaf under both the core API (:mod:`.core`: ``emit``, ``span``,
``set_stream``) and the backends: the ``grpc`` and ``statsd`` backends read the
default stream here, and the core learns of a new default through
:func:`on_replace`. So the core imports the backends and no backend imports the
core: the package's import graph has no cycle.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ..native_stream import AnyTelemetryStream, NativeTelemetryStream
from ..stream import TelemetryStream
from . import implementation

_stream: AnyTelemetryStream | None = None
_lock = threading.RLock()
_listeners: list[Callable[[], None]] = []


def new_stream(queue_size: int | None = None, **kwargs: Any) -> AnyTelemetryStream:
    """A new stream of the implementation in use (arguments as for :class:`TelemetryStream`)."""
    if implementation.native() is not None:
        return NativeTelemetryStream(queue_size, **kwargs)
    return TelemetryStream(queue_size, **kwargs)


def current() -> AnyTelemetryStream | None:
    """The default stream without creating one (``None`` until first needed)."""
    return _stream


def get_stream() -> AnyTelemetryStream:
    """Return the default stream, creating it on first use."""
    stream = _stream
    if stream is None:
        with _lock:
            stream = _stream
            if stream is None:
                stream = replace(new_stream())
    return stream


def replace(stream: AnyTelemetryStream) -> AnyTelemetryStream:
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
