"""The ``stderr`` backend: one ``SNAKEPIT_TELEMETRY_EVENT {json}`` line per event.

Emit only appends to a bounded queue; a daemon thread does the writing, so a
stderr pipe nobody reads blocks that thread, never the caller. Once the queue is
full, further events are dropped and counted.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections import deque
from typing import Any, TextIO

from .._internal import env, errors
from .._internal.convert import Scalar
from .._internal.spans import Frame
from .base import Backend

__all__ = [
    "DEFAULT_STDERR_QUEUE",
    "LINE_PREFIX",
    "STDERR_QUEUE_ENV",
    "StderrBackend",
    "format_line",
]

log = logging.getLogger(__name__)

LINE_PREFIX = "SNAKEPIT_TELEMETRY_EVENT "
STDERR_QUEUE_ENV = "SNAKEPIT_TELEMETRY_STDERR_QUEUE"
DEFAULT_STDERR_QUEUE = 1024

_Item = tuple[tuple[str, ...], dict[str, Scalar], dict[str, str], int, str, int, tuple[Frame, ...]]


def _json_value(value: Scalar) -> Scalar:
    """JSON has no NaN/inf: send them as strings, which the Elixir side drops and counts."""
    if type(value) is float and not math.isfinite(value):
        if math.isnan(value):
            return "NaN"
        return "Infinity" if value > 0 else "-Infinity"
    return value


def format_line(
    parts: tuple[str, ...],
    measurements: dict[str, Scalar],
    metadata: dict[str, str],
    timestamp_ns: int,
    correlation_id: str,
    span_id: int = 0,
    stacktrace: tuple[Frame, ...] = (),
) -> str:
    """The exact line written for one event (without the newline).

    Span events add ``span_id`` (an integer) and exception events ``stacktrace``
    (``[{"file", "line", "function"}, ...]``, innermost first), as in
    ``TelemetryEvent``.
    """
    obj: dict[str, Any] = {
        "event_parts": list(parts),
        "measurements": {k: _json_value(v) for k, v in measurements.items()},
        "metadata": metadata,
        "timestamp_ns": timestamp_ns,
    }
    if correlation_id:
        obj["correlation_id"] = correlation_id
    if span_id:
        obj["span_id"] = span_id
    if stacktrace:
        obj["stacktrace"] = [{"file": f, "line": n, "function": fn} for f, n, fn in stacktrace]
    return LINE_PREFIX + json.dumps(obj, separators=(",", ":"), allow_nan=False)


class StderrBackend(Backend):
    """JSON lines on stderr (or ``out``), written by a daemon thread from a bounded queue."""

    name = "stderr"

    def __init__(self, out: TextIO | None = None, queue_size: int | None = None) -> None:
        super().__init__()
        self._out = out  # None: whatever sys.stderr is at write time
        if queue_size is None:
            self._queue_size = env.positive_int(STDERR_QUEUE_ENV, DEFAULT_STDERR_QUEUE)
        else:
            self._queue_size = max(1, queue_size)
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._writing = 0  # lines taken off the queue, not yet written
        self._thread: threading.Thread | None = None
        self._counts.update(written=0, queue_len=0)

    def emit(
        self,
        parts: tuple[str, ...],
        measurements: dict[str, Scalar],
        metadata: dict[str, str],
        timestamp_ns: int,
        correlation_id: str,
    ) -> None:
        self.emit_span_event(parts, measurements, metadata, timestamp_ns, correlation_id, 0, ())

    def emit_span_event(
        self,
        parts: tuple[str, ...],
        measurements: dict[str, Scalar],
        metadata: dict[str, str],
        timestamp_ns: int,
        correlation_id: str,
        span_id: int,
        stacktrace: tuple[Frame, ...],
    ) -> None:
        item = (parts, measurements, metadata, timestamp_ns, correlation_id, span_id, stacktrace)
        with self._cond:
            if len(self._queue) >= self._queue_size:
                dropped = True
            else:
                dropped = False
                self._queue.append(item)
                if self._thread is None:
                    self._start_writer()
                elif len(self._queue) == 1:
                    self._cond.notify_all()
        if dropped:
            self.count("dropped")

    def _start_writer(self) -> None:
        """Started on the first event so an unused backend costs no thread."""
        self._thread = threading.Thread(
            target=self._write_loop, name="snakepit-telemetry-stderr", daemon=True
        )
        self._thread.start()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                batch = list(self._queue)
                self._queue.clear()
                self._writing = len(batch)
            lines: list[str] = []
            failed = 0
            for item in batch:
                try:
                    lines.append(format_line(*item) + "\n")
                except Exception:
                    failed += 1
            written = 0
            if lines:
                try:
                    out = self._out if self._out is not None else sys.stderr
                    out.write("".join(lines))  # blocks here while the pipe is full
                    out.flush()
                    written = len(lines)
                except Exception:
                    failed += len(lines)
            with self._counts_lock:
                self._counts["written"] += written
                self._counts["errors"] += failed
            if failed:
                errors.count(failed)
            with self._cond:
                self._writing = 0
                self._cond.notify_all()

    def flush(self, timeout: float = 1.0) -> bool:
        """Wait until every queued line was written (or failed); ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
        return True

    def close(self) -> None:
        """Give queued lines up to a second; the daemon writer stays for later events."""
        self.flush(1.0)

    def stats(self) -> dict[str, Any]:
        stats = super().stats()
        with self._cond:
            stats["queue_len"] = len(self._queue) + self._writing
        stats["queue_size"] = self._queue_size
        return stats
