"""A Snakepit v0.13-style telemetry worker for the Elixir tests (not part of the package).

It behaves as Snakepit v0.13's Python telemetry stream does (its
``snakepit_bridge/telemetry/stream.py``; this is a stand-in written for the tests,
not that code), so the tests can hold the Elixir side to what such a worker needs:

* it serves ``StreamTelemetry`` only (``StreamTelemetryBatches`` is UNIMPLEMENTED),
  one ``TelemetryEvent`` per message;
* control is applied when an event is emitted: toggle first, then sampling with one
  global rate (``event_patterns`` of a sampling update are ignored; an event is
  dropped when ``random.random() > rate``, each event alone, spans included), then
  the allow/deny filter (``fnmatch``; deny wins, an empty allow list allows all);
* events emitted while no stream is open are buffered (up to 1024) under the
  control in force then and sent as they are when a stream opens: control that
  arrives on that stream never reaches them;
* events are built as v0.13 builds them: ``event_parts`` = the name split on ``.``,
  ``timestamp_ns`` = ``time.time_ns()``, ``correlation_id`` = the id or ``""``, a
  ``bool`` measurement as ``int_value``, ``int`` as ``int_value``, ``float`` as
  ``float_value``, anything else as ``string_value`` of ``str(value)``, and every
  metadata value as ``str(value)``; a span sends ``<op>.start`` {system_time},
  then ``<op>.stop`` {duration} or ``<op>.exception`` {duration} with ``error_type``
  and ``error_message`` added to its metadata, durations in nanoseconds.

Protocol (stdout): ``SNAKEPIT_TELEMETRY_READY <address>`` once it listens, then
``SNAKEPIT_TELEMETRY_ACK <cmd> <json>`` after each stdin command (``error`` for a
bad one). Commands (one JSON object per line):

* ``emit`` {event, measurements, metadata, correlation_id, count: 1} -> {"count": n};
* ``span`` {name, metadata, correlation_id, correlation_prefix, count: 1, fail:
  false}: ``count`` spans (correlation ids ``<prefix>-<i>`` when a prefix is given)
  -> {"count": n};
* ``showcase`` {operation, correlation_id}: what v0.13's showcase ``telemetry_demo``
  tool emits: ``tool.execution.start``, then a ``tool.execution`` span around a
  ``tool.result_size`` {bytes: 42} -> {"count": 4};
* ``marker`` {type}: v0.13's ``snakepit.serialization.unserializable_marker``
  {first_seen: 1} {type} -> {"count": 1};
* ``controls`` -> {"controls": [every control message received, in order]};
* ``state`` -> {enabled, sampling_rate, allow, deny, open, buffered, queued, sent};
* ``wait_sent`` {timeout_ms} -> {"sent": bool}: whether everything emitted so far
  was handed to gRPC in time.

Usage: python old_worker.py [--listen HOST:PORT]; exits when stdin closes.
"""

from __future__ import annotations

import argparse
import collections
import fnmatch
import json
import queue
import random
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc

from snakepit_telemetry import snakepit_bridge_pb2 as pb

SERVICE = "snakepit.bridge.BridgeService"
READY = "SNAKEPIT_TELEMETRY_READY"
ACK = "SNAKEPIT_TELEMETRY_ACK"
MAX_BUFFER = 1024


class OldStream:
    """The v0.13 behaviour described in the module docstring."""

    def __init__(self) -> None:
        self.enabled = True
        self.sampling_rate = 1.0
        self.allow: list[str] = []
        self.deny: list[str] = []
        self.controls: list[dict[str, Any]] = []
        self._lock = threading.Condition()
        self._open = False
        self._buffer: collections.deque[pb.TelemetryEvent] = collections.deque()
        self._queue: queue.Queue[pb.TelemetryEvent] = queue.Queue()
        self._emitted = 0
        self._sent = 0

    # -- emitting -------------------------------------------------------------

    def _allowed(self, name: str) -> bool:
        if any(fnmatch.fnmatch(name, p) for p in self.deny):
            return False
        return not self.allow or any(fnmatch.fnmatch(name, p) for p in self.allow)

    def emit(
        self,
        name: str,
        measurements: dict[str, Any],
        metadata: dict[str, Any] | None = None,
        correlation_id: str | None = None,
    ) -> None:
        if not self.enabled:
            return
        if self.sampling_rate < 1.0 and random.random() > self.sampling_rate:
            return
        if not self._allowed(name):
            return
        event = pb.TelemetryEvent(
            event_parts=name.split("."),
            timestamp_ns=time.time_ns(),
            correlation_id=correlation_id or "",
        )
        for key, value in measurements.items():
            if isinstance(value, bool):
                value = int(value)
            slot = event.measurements[key]
            if isinstance(value, int):
                slot.int_value = value
            elif isinstance(value, float):
                slot.float_value = value
            else:
                slot.string_value = str(value)
        for key, value in (metadata or {}).items():
            event.metadata[key] = str(value)
        with self._lock:
            self._emitted += 1
            if self._open:
                self._queue.put(event)
            elif len(self._buffer) < MAX_BUFFER:
                self._buffer.append(event)
            else:
                self._emitted -= 1

    def span(
        self,
        name: str,
        metadata: dict[str, Any] | None,
        correlation_id: str | None,
        fail: bool,
        inner: Any = None,
    ) -> None:
        start = time.time_ns()
        self.emit(f"{name}.start", {"system_time": start}, metadata, correlation_id)
        if inner is not None:
            inner()
        duration = time.time_ns() - start
        if fail:
            error_metadata = dict(metadata or {})
            error_metadata["error_type"] = "ValueError"
            error_metadata["error_message"] = "simulated failure"
            self.emit(f"{name}.exception", {"duration": duration}, error_metadata, correlation_id)
        else:
            self.emit(f"{name}.stop", {"duration": duration}, metadata, correlation_id)

    # -- the stream -----------------------------------------------------------

    def apply(self, control: pb.TelemetryControl) -> None:
        which = control.WhichOneof("control")
        if which == "toggle":
            self.enabled = control.toggle.enabled
            record: dict[str, Any] = {"toggle": control.toggle.enabled}
        elif which == "sampling":
            # v0.13: the rate becomes the global rate; patterns are ignored.
            self.sampling_rate = max(0.0, min(control.sampling.sampling_rate, 1.0))
            record = {
                "sampling": {
                    "rate": control.sampling.sampling_rate,
                    "patterns": list(control.sampling.event_patterns),
                }
            }
        elif which == "filter":
            self.allow = list(control.filter.allow)
            self.deny = list(control.filter.deny)
            record = {"filter": {"allow": self.allow, "deny": self.deny}}
        else:
            record = {"unknown": True}
        with self._lock:
            self.controls.append(record)

    def serve(
        self, requests: Iterator[pb.TelemetryControl], context: grpc.ServicerContext
    ) -> Iterator[pb.TelemetryEvent]:
        def consume() -> None:
            try:
                for control in requests:
                    self.apply(control)
            except Exception:  # noqa: BLE001 - the call ended
                pass

        # As v0.13's server does: response headers at once, before any event.
        context.send_initial_metadata(())
        threading.Thread(target=consume, daemon=True).start()
        with self._lock:
            self._open = True
            while self._buffer:
                self._queue.put(self._buffer.popleft())
        try:
            while context.is_active():
                try:
                    event = self._queue.get(timeout=0.05)
                except queue.Empty:
                    continue
                yield event
                with self._lock:
                    self._sent += 1
                    self._lock.notify_all()
        finally:
            with self._lock:
                self._open = False

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "enabled": self.enabled,
                "sampling_rate": self.sampling_rate,
                "allow": self.allow,
                "deny": self.deny,
                "open": self._open,
                "buffered": len(self._buffer),
                "queued": self._queue.qsize(),
                "sent": self._sent,
            }

    def wait_sent(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._sent < self._emitted:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True


def run_command(stream: OldStream, cmd: dict[str, Any]) -> dict[str, Any]:
    name = cmd.get("cmd")
    if name == "emit":
        count = int(cmd.get("count", 1))
        for _ in range(count):
            stream.emit(
                cmd["event"],
                cmd.get("measurements", {}),
                cmd.get("metadata"),
                cmd.get("correlation_id"),
            )
        return {"count": count}
    if name == "span":
        count = int(cmd.get("count", 1))
        prefix = cmd.get("correlation_prefix")
        for i in range(count):
            cid = f"{prefix}-{i}" if prefix is not None else cmd.get("correlation_id")
            stream.span(cmd["name"], cmd.get("metadata"), cid, bool(cmd.get("fail", False)))
        return {"count": count}
    if name == "showcase":
        operation = cmd.get("operation", "compute")
        cid = cmd.get("correlation_id")
        meta = {"tool": "telemetry_demo", "operation": operation}
        stream.emit("tool.execution.start", {"system_time": time.time_ns()}, meta, cid)

        def work() -> None:
            stream.emit("tool.result_size", {"bytes": 42}, {"tool": "telemetry_demo"}, cid)

        stream.span("tool.execution", meta, cid, bool(cmd.get("fail", False)), work)
        return {"count": 4}
    if name == "marker":
        stream.emit(
            "snakepit.serialization.unserializable_marker",
            {"first_seen": 1},
            {"type": cmd.get("type", "builtins.object")},
        )
        return {"count": 1}
    if name == "controls":
        with stream._lock:  # noqa: SLF001 - same module
            return {"controls": list(stream.controls)}
    if name == "state":
        return stream.state()
    if name == "wait_sent":
        return {"sent": stream.wait_sent(int(cmd.get("timeout_ms", 5000)) / 1000)}
    raise ValueError(f"unknown command {name!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    args = parser.parse_args()

    stream = OldStream()
    methods = {
        "StreamTelemetry": grpc.stream_stream_rpc_method_handler(
            stream.serve,
            request_deserializer=pb.TelemetryControl.FromString,
            response_serializer=pb.TelemetryEvent.SerializeToString,
        )
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port(args.listen)
    address = (
        args.listen
        if args.listen.startswith("unix:")
        else f"{args.listen.rsplit(':', 1)[0]}:{port}"
    )
    server.start()
    print(f"{READY} {address}", flush=True)
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            result = run_command(stream, cmd)
            print(f"{ACK} {cmd.get('cmd')} {json.dumps(result)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - reported, never fatal
            print(f"{ACK} error {json.dumps(str(exc))}", flush=True)
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
