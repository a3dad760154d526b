"""The ``statsd`` backend: DogStatsD lines over UDP.

Mapping per event (``<event>`` is the dotted Python name, ``P`` the prefix):

* ``duration`` (ns) -> ``P.<event>.duration:<ms>|ms`` (ms with up to 6 decimals);
* other int/float measurements -> ``P.<event>.<key>:<value>|g``; string and
  non-finite values are skipped (non-finite ones counted in ``dropped``);
* events ending in ``.exception`` and ``python.error.occurred`` also send
  ``P.<event>.count:1|c``;
* every line ends with ``|@<rate>`` when sampled below 1, then ``|#k:v,...``
  (metadata, sorted keys). The correlation ID is never a tag (unbounded cardinality).

The rate comes from the default :class:`TelemetryStream`'s control state (the
``SNAKEPIT_TELEMETRY_SAMPLING_RATE`` env and, while served, Elixir's controls),
and this backend samples with it itself, so the annotation is truthful. Enable
toggles and allow/deny filters are not applied here.

The socket is unconnected and non-blocking: ``sendto`` never waits. A full socket
buffer counts ``dropped``; any other socket error counts ``errors``. With an
unconnected UDP socket the kernel does not report ICMP "port unreachable", so a
dead port on a reachable host is silent loss (as with any statsd client).
"""

from __future__ import annotations

import logging
import math
import os
import random
import re
import socket
from collections.abc import Callable
from typing import Any

from .._internal.convert import Scalar
from .._internal.defaults import get_stream
from .base import Backend

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "DEFAULT_PREFIX",
    "MAX_PACKET",
    "StatsdBackend",
    "format_lines",
]

log = logging.getLogger(__name__)

HOST_ENV = "SNAKEPIT_TELEMETRY_STATSD_HOST"
PORT_ENV = "SNAKEPIT_TELEMETRY_STATSD_PORT"
PREFIX_ENV = "SNAKEPIT_TELEMETRY_STATSD_PREFIX"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8125
DEFAULT_PREFIX = "snakepit"
# Safe UDP payload for a 1500-byte MTU; lines of one event are packed up to this.
MAX_PACKET = 1432
COUNTED_EVENTS = frozenset({"python.error.occurred"})

_NAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")
_TAG_BAD = re.compile(r"[|,#\r\n]")

RateSource = Callable[[str], float]


def _metric(text: str) -> str:
    """Metric name characters statsd servers agree on; anything else becomes ``_``."""
    return _NAME_BAD.sub("_", text)


def _tag(text: str) -> str:
    return _TAG_BAD.sub("_", text)


def _number(value: float | int) -> str:
    if type(value) is int:
        return str(value)
    return repr(float(value))


def _millis(duration_ns: float | int) -> str:
    text = f"{duration_ns / 1_000_000:.6f}".rstrip("0").rstrip(".")
    return text or "0"


def format_lines(
    prefix: str,
    parts: tuple[str, ...],
    measurements: dict[str, Scalar],
    metadata: dict[str, str],
    rate: float = 1.0,
) -> tuple[list[str], int]:
    """The lines for one event, and how many measurements were not representable."""
    event = ".".join(parts)
    base = _metric(f"{prefix}.{event}" if prefix else event)
    suffix = f"|@{rate:g}" if rate < 1.0 else ""
    if metadata:
        tags = ",".join(
            f"{_tag(k).replace(':', '_')}:{_tag(metadata[k])}" for k in sorted(metadata)
        )
        suffix += f"|#{tags}"
    lines: list[str] = []
    skipped = 0
    for key, value in measurements.items():
        if type(value) is str:
            continue
        if type(value) is float and not math.isfinite(value):
            skipped += 1
            continue
        if key == "duration":
            lines.append(f"{base}.duration:{_millis(value)}|ms{suffix}")
        else:
            lines.append(f"{base}.{_metric(key)}:{_number(value)}|g{suffix}")
    if parts[-1] == "exception" or event in COUNTED_EVENTS:
        lines.append(f"{base}.count:1|c{suffix}")
    return lines, skipped


def _packets(lines: list[str]) -> list[bytes]:
    """Pack newline-separated lines into datagrams of at most MAX_PACKET bytes."""
    packets: list[bytes] = []
    current = b""
    for line in lines:
        data = line.encode("utf-8", "replace")
        if current and len(current) + 1 + len(data) > MAX_PACKET:
            packets.append(current)
            current = b""
        current = current + b"\n" + data if current else data
    if current:
        packets.append(current)
    return packets


def _default_rate_source() -> RateSource:
    return lambda event: get_stream().sample_rate(event)


class StatsdBackend(Backend):
    """Fire-and-forget DogStatsD over an unconnected, non-blocking UDP socket."""

    name = "statsd"

    def __init__(
        self,
        host: str | None = None,
        port: int | None = None,
        prefix: str | None = None,
        rate_source: RateSource | None = None,
    ) -> None:
        super().__init__()
        self.host = host if host is not None else os.environ.get(HOST_ENV) or DEFAULT_HOST
        self.port = port if port is not None else _port_from_env()
        raw_prefix = prefix if prefix is not None else os.environ.get(PREFIX_ENV, DEFAULT_PREFIX)
        self.prefix = raw_prefix.strip(".")
        self._rate = rate_source if rate_source is not None else _default_rate_source()
        self._random = random.Random()
        self._counts.update(sent=0, sampled_out=0)
        self._sock: socket.socket | None = None
        self._addr: Any = None
        try:
            family, _, _, _, addr = socket.getaddrinfo(self.host, self.port, 0, socket.SOCK_DGRAM)[
                0
            ]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sock, self._addr = sock, addr
        except OSError as exc:
            # Every later event counts an error; telemetry must not fail the process.
            log.debug("statsd backend disabled: cannot use %s:%s: %s", self.host, self.port, exc)

    def emit(
        self,
        parts: tuple[str, ...],
        measurements: dict[str, Scalar],
        metadata: dict[str, str],
        timestamp_ns: int,
        correlation_id: str,
    ) -> None:
        rate = 1.0
        try:
            rate = float(self._rate(".".join(parts)))
        except Exception:
            self.count("errors")
        if rate < 1.0 and self._random.random() >= rate:
            self.count("sampled_out")
            return
        lines, skipped = format_lines(self.prefix, parts, measurements, metadata, rate)
        if skipped:
            self.count("dropped", skipped)
        if not lines:
            return
        sock = self._sock
        if sock is None:
            self.count("errors")
            return
        for packet in _packets(lines):
            try:
                sock.sendto(packet, self._addr)
            except (BlockingIOError, InterruptedError):
                self.count("dropped")
            except OSError:
                self.count("errors")
            else:
                self.count("sent")

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()


def _port_from_env() -> int:
    raw = os.environ.get(PORT_ENV, "")
    try:
        port = int(raw)
    except ValueError:
        port = -1
    if not 0 < port < 65536:
        if raw.strip():
            log.debug("ignoring %s=%r: expected a port number", PORT_ENV, raw)
        return DEFAULT_PORT
    return port
