"""Periodic process resource samples: ``python.memory.sampled`` and ``python.cpu.sampled``.

One daemon thread emits both events every interval, so Elixir can chart a
worker's memory and CPU without polling the OS itself. The interval comes from
``SNAKEPIT_TELEMETRY_SAMPLER_INTERVAL_MS`` (default 10000, 0 disables; bad values
fall back to the default) unless :func:`start_samplers` is given one. The first
samples come one interval after the start.

Memory: ``rss_bytes`` from ``/proc/self/statm`` (Linux), ``peak_rss_bytes`` from
``resource.getrusage``. A measurement the platform cannot provide is left out
rather than guessed. CPU: ``time.process_time_ns`` (user + system, all threads).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

from ._internal import env, errors
from ._internal.core import emit

__all__ = [
    "CPU_EVENT",
    "DEFAULT_SAMPLER_INTERVAL_MS",
    "MEMORY_EVENT",
    "SAMPLER_INTERVAL_ENV",
    "read_memory",
    "sampler_interval_from_env",
    "samplers_running",
    "start_samplers",
    "stop_samplers",
]

log = logging.getLogger(__name__)

MEMORY_EVENT = "python.memory.sampled"
CPU_EVENT = "python.cpu.sampled"
SAMPLER_INTERVAL_ENV = "SNAKEPIT_TELEMETRY_SAMPLER_INTERVAL_MS"
DEFAULT_SAMPLER_INTERVAL_MS = 10_000

try:
    import resource
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]

try:
    _PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):
    _PAGE_SIZE = 4096

# ru_maxrss is in kilobytes on Linux and the BSDs, in bytes on macOS.
_MAXRSS_UNIT = 1 if sys.platform == "darwin" else 1024

_lock = threading.Lock()
_sampler: _Sampler | None = None


def sampler_interval_from_env() -> float:
    """Seconds between samples from the environment; 0 means off."""
    return env.seconds_from_ms(SAMPLER_INTERVAL_ENV, DEFAULT_SAMPLER_INTERVAL_MS)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _peak_rss_bytes() -> int | None:
    if resource is None:
        return None
    try:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * _MAXRSS_UNIT
    except (OSError, ValueError, AttributeError):
        return None


def read_memory() -> dict[str, int]:
    """Current and peak resident set size in bytes; keys the platform lacks are absent."""
    out: dict[str, int] = {}
    rss = _rss_bytes()
    peak = _peak_rss_bytes()
    if rss is not None:
        out["rss_bytes"] = rss
    if peak is not None:
        # The two sources round differently; a peak below the current value is noise.
        out["peak_rss_bytes"] = max(peak, rss) if rss is not None else peak
    return out


class _Sampler(threading.Thread):
    """The sampling thread; CPU figures are deltas against its previous sample."""

    def __init__(self, interval: float) -> None:
        super().__init__(name="snakepit-telemetry-samplers", daemon=True)
        self.interval = interval
        self.stopping = threading.Event()
        self._last_wall = time.monotonic_ns()
        self._last_cpu = time.process_time_ns()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sample()

    def sample(self) -> None:
        try:
            emit(MEMORY_EVENT, read_memory())
            wall, cpu = time.monotonic_ns(), time.process_time_ns()
            cpu_time = max(0, cpu - self._last_cpu)
            elapsed = wall - self._last_wall
            self._last_wall, self._last_cpu = wall, cpu
            percent = 100.0 * cpu_time / elapsed if elapsed > 0 else 0.0
            emit(CPU_EVENT, {"cpu_percent": percent, "cpu_time": cpu_time})
        except Exception:
            errors.count()  # a sampler must never take the worker down


def start_samplers(interval_s: float | None = None) -> bool:
    """Start the sampling thread; returns whether samplers are running.

    ``interval_s`` overrides the environment; 0 (or less) leaves them off. A second
    call while running changes nothing (stop first to change the interval).
    """
    global _sampler
    interval = sampler_interval_from_env() if interval_s is None else float(interval_s)
    with _lock:
        if _sampler is not None:
            return True
        if not interval > 0:  # also rejects NaN
            return False
        _sampler = _Sampler(interval)
        _sampler.start()
    return True


def stop_samplers(timeout: float = 2.0) -> None:
    """Stop the sampling thread if it runs; safe to call any number of times."""
    global _sampler
    with _lock:
        sampler, _sampler = _sampler, None
    if sampler is None:
        return
    sampler.stopping.set()
    if sampler is not threading.current_thread():
        sampler.join(timeout)


def samplers_running() -> bool:
    """Whether the sampling thread is active."""
    return _sampler is not None
