"""Command worker for the demo, the tests and the benchmarks (not shipped).

Run from a checkout: ``PYTHONPATH=priv/python python support/python/command_worker.py``
(``Snakepit.Telemetry.PythonWorker``, also dev/test-only, does that). It is not
part of the ``snakepit_telemetry`` package: a real Snakepit worker is Snakepit's own
gRPC server, which adds the telemetry methods with
``snakepit_telemetry.telemetry.add_to_server`` as this one does.

Stands in for a Snakepit Python worker in the Elixir demo and tests: it serves
StreamTelemetry and produces events on command. Its server carries
:class:`TelemetryInterceptor` and a raw-bytes ``BridgeService/Ping`` method (echo;
emits ``tool.result_size`` {bytes} {tool: "ping"} inside the call, raises
``ValueError`` for the payload ``b"fail"``), so real RPCs produce ``python.call.*``
spans. Protocol (stdout, one line each):

* ``SNAKEPIT_TELEMETRY_READY <address>`` once the server listens: the address
  Elixir registers the worker with (its telemetry address: the Rust server's
  with ``--telemetry-listen``, else the grpcio server's);
* ``SNAKEPIT_TELEMETRY_ACK <cmd> <json>`` after each stdin command
  (``<cmd>`` is ``error`` for bad JSON or an unknown command);
* ``SNAKEPIT_TELEMETRY_WORKLOAD_DONE {"calls": N}`` when a workload finishes;
* ``SNAKEPIT_TELEMETRY_LOG <LEVEL> <message>`` for each warning (or worse) the
  ``snakepit_telemetry`` package logs, e.g. the once-per-process warning of a
  worker started without a secret (``PythonWorker.lines/1`` keeps them).

Commands (one JSON object per stdin line, ACK payload after the arrow):

* ``emit`` {event, measurements, metadata, correlation_id, count} -> {"count": N};
* ``emit_many`` {events: [{event, measurements, metadata, correlation_id}, ...],
  repeat: K} emits the list K times in order -> {"count": len(events) * K};
* ``span`` {name, metadata, correlation_id, fail} -> {"fail": bool};
* ``spans`` {name: "python.call", count: N, correlation_prefix: "p", metadata}
  runs N spans with correlation ids ``p-0 .. p-(N-1)`` -> {"count": N};
* ``unknown`` / ``unknown_keys`` {count}: events with random names / keys;
* ``flood`` {event, count} -> {"count": N, "seconds": s};
* ``paced`` {count, rate}: ``python.call.start`` events whose ``system_time`` is
  the emit time, at ``rate`` per second on a fixed schedule (for latency
  measurements) -> {"count": N, "seconds": s};
* ``spanwork`` {calls, work_us: 1000, telemetry: true, mode: "spin"}: ``calls``
  calls of about ``work_us`` of CPU work (``mode: "sleep"``: one call every
  ``work_us``, sleeping, so the process CPU is the telemetry's own), each in a
  ``python.call`` span unless ``telemetry`` is false; waits until the events were
  handed to gRPC -> {"calls": N, "cpu_s": process CPU (all threads) over the
  run, "wall_s": s}. The work per call is calibrated once per ``work_us`` (the
  first spin run), so every later run does exactly the same work;
* ``spanab`` {calls, work_us: 1000, block: 20, first: "off"}: an A/B of busy
  calls as ``spanwork`` spins them, ``calls`` without telemetry and ``calls``
  each in a ``python.call`` span, in alternating blocks of ``block`` calls (ABBA
  order from ``first``: off, on, on, off, off, ...), so both sides see the same
  machine load; the process CPU (all threads) of each block goes to its side,
  and a block of spans ends once its events were handed to gRPC
  (``wait_drained``), so its telemetry work is not left to the next block ->
  {"calls": per side, "blocks": per side, "cpu_on_s", "cpu_off_s",
  "calling_on_s", "calling_off_s" (the calling thread's share),
  "calling_drain_s" (the calling thread's CPU in ``wait_drained``),
  "calling_inline_s" (time the calling thread spent sending due batches itself,
  native stream served by its Rust server), "wall_s"};
* ``rusage`` -> {"cpu_s": process CPU time so far, "rss_kb": resident memory};
* ``threads`` -> {tid: {"name", "cpu_s", "voluntary", "involuntary"}} for each
  thread of the process (Linux ``/proc``: CPU from ``schedstat`` in ns, else in
  clock ticks; context switches);
* ``write_stderr`` {parts: [{hex, repeat: 1}, ...]} writes to stderr, in one
  write, the bytes each ``hex`` encodes ``repeat`` times over (any bytes, e.g.
  invalid UTF-8 or an over-long telemetry line) -> {"bytes": n};
* ``workload`` {calls, interval_ms, correlation_prefix}: runs in the background
  and prints WORKLOAD_DONE -> {"started": true};
* ``call`` {payload: "hello", correlation_id} makes a real Ping RPC to the worker's
  own server, sending ``x-snakepit-correlation-id`` when given -> {"ok": bool};
* ``gc`` {generation} runs ``gc.collect()`` (and, with the GC hook installed,
  waits until its ``python.gc.completed`` is queued) -> {"collected": n};
* ``error`` {tool: "t", correlation_id} calls a ``@telemetry.tool("t")`` function
  that raises (the worker catches it) -> {"reported": true};
* commands of a ``--commands FILE`` (see below);
* ``stats`` -> the stream counters plus ``"control"``, the control state in force,
  and ``"implementation"`` (``"native"`` or ``"python"``);
* ``info`` -> {"implementation": "native" | "python", "telemetry_address": the
  READY address, "grpc_address": the grpcio server's, "serving": "rust" |
  "grpcio"};
* ``backend_stats`` -> ``{name: stats}`` for each backend in use;
* ``wait_drained`` {timeout_ms} -> {"drained": bool};
* ``exit`` -> {"exit": true}, then the worker exits.

The stream's defaults come from ``SNAKEPIT_TELEMETRY_*`` environment variables
(queue size, enabled, sampling rate, allow/deny globs, stats interval); its
implementation is the package's choice (``SNAKEPIT_TELEMETRY_IMPLEMENTATION``:
``auto``, ``native`` or ``python``; ``telemetry.new_stream``). The worker always
serves the telemetry methods on its grpcio server (``add_to_server``, as a
Snakepit worker does). ``--telemetry-listen ADDRESS`` (``host:port``, port 0
picks one, or ``unix:/abs/path``) serves them from the native implementation's
Rust server instead (``telemetry.serve``) and announces that address on the
READY line; the worker exits 1 when it cannot (the python implementation, a
bad address). Without the option, ``SNAKEPIT_TELEMETRY_LISTEN`` in the
environment (``Config.worker_env(pool, telemetry_address: ...)``) does the
same, except that on the python implementation the worker logs a warning and
announces its grpcio address.
``--samplers [MS]`` starts the memory/CPU samplers (MS overrides
``SNAKEPIT_TELEMETRY_SAMPLER_INTERVAL_MS``; 0 = off); ``--gc-events`` or
``SNAKEPIT_TELEMETRY_GC_EVENTS=true`` installs the GC hook. ``--backend NAME``
(``grpc``, ``stderr``, ``otel``, ``statsd``, ``none`` or a comma list) overrides
``SNAKEPIT_TELEMETRY_BACKEND`` (default ``grpc``); with ``stderr`` the events are
``SNAKEPIT_TELEMETRY_EVENT {json}`` lines on this process's stderr.
``--commands FILE`` (repeatable) adds the commands of the ``COMMANDS`` dict
(name -> function of the command object, returning the ACK payload) that the
Python file defines: the tests load ``test/support/python/hostile_commands.py``
for the decoder-hostile ``hostile`` command.

Stdin EOF or ``{"cmd": "exit"}`` stops the server and exits 0, so the worker
never outlives a parent that closed its end of the pipe.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import random
import runpy
import sys
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any, TextIO

import grpc

from snakepit_telemetry.telemetry import (
    SERVER_OPTIONS,
    SERVICE_NAME,
    TelemetryInterceptor,
    TelemetryStream,
    add_port,
    add_to_server,
    backend_stats,
    correlation,
    emit,
    get_backend,
    install_gc_hook,
    new_stream,
    serve,
    set_backend,
    set_stream,
    span,
    start_samplers,
    stop_samplers,
    tool,
    uninstall_gc_hook,
)
from snakepit_telemetry.telemetry import implementation as telemetry_implementation
from snakepit_telemetry.telemetry.correlation import CORRELATION_HEADER
from snakepit_telemetry.telemetry.gc_events import flush_gc_events, gc_events_from_env

READY = "SNAKEPIT_TELEMETRY_READY"
ACK = "SNAKEPIT_TELEMETRY_ACK"
WORKLOAD_DONE = "SNAKEPIT_TELEMETRY_WORKLOAD_DONE"
LOG = "SNAKEPIT_TELEMETRY_LOG"
LISTEN_ENV = "SNAKEPIT_TELEMETRY_LISTEN"
STOP_GRACE_S = 0.5
PING_METHOD = f"/{SERVICE_NAME}/Ping"
CALL_TIMEOUT_S = 5.0


class CommandError(Exception):
    """A command that cannot run; reported as an ``error`` ACK, never fatal."""


class _SyntheticFailure(RuntimeError):
    """Raised by the workload so its exception events are easy to recognise."""


class Output:
    """Line-atomic, flushed writes: the workload thread prints concurrently."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._lock = threading.Lock()

    def line(self, text: str) -> None:
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()


class _LogLines(logging.Handler):
    """The package's warnings as ``SNAKEPIT_TELEMETRY_LOG`` output lines."""

    def __init__(self, out: Output) -> None:
        super().__init__(logging.WARNING)
        self._out = out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage().replace("\n", " ")
            self._out.line(f"{LOG} {record.levelname} {text}")
        except Exception:
            self.handleError(record)


def _int_arg(cmd: dict[str, Any], key: str, default: int | None = None) -> int:
    """Fetch a non-negative int argument, rejecting bools and other types."""
    value = cmd.get(key, default)
    if type(value) is not int or value < 0:
        raise CommandError(f"{key!r} must be a non-negative integer, got {value!r}")
    return value


def _opt_dict(cmd: dict[str, Any], key: str) -> dict[str, Any] | None:
    value = cmd.get(key)
    if value is not None and not isinstance(value, dict):
        raise CommandError(f"{key!r} must be an object or null")
    return value


def _token() -> str:
    return os.urandom(8).hex()


def ping(request: bytes, _context: grpc.ServicerContext) -> bytes:
    """Echo; the event it emits shows whether the caller's correlation ID got through."""
    emit("tool.result_size", {"bytes": len(request)}, {"tool": "ping"})
    if request == b"fail":
        raise ValueError("ping asked to fail")
    return request


def add_ping(server: grpc.Server) -> None:
    """Register Ping beside StreamTelemetry; no serializers, so it moves raw bytes."""
    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME, {"Ping": grpc.unary_unary_rpc_method_handler(ping)}
    )
    server.add_generic_rpc_handlers((handler,))


class Worker:
    """Executes stdin commands against the public telemetry API."""

    def __init__(
        self,
        stream: TelemetryStream,
        out: Output,
        address: str | None = None,
        telemetry_address: str | None = None,
    ) -> None:
        self.stream = stream
        self.out = out
        self.address = address
        # Where Elixir reaches the telemetry calls: the Rust server when serving natively.
        self.telemetry_address = telemetry_address or address
        self._channel: grpc.Channel | None = None
        # spanwork's loop iterations per work_us, measured once: runs with and
        # without telemetry must do the same work.
        self._spins: dict[int, int] = {}
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "emit": self.cmd_emit,
            "span": self.cmd_span,
            "spans": self.cmd_spans,
            "emit_many": self.cmd_emit_many,
            "unknown": self.cmd_unknown,
            "unknown_keys": self.cmd_unknown_keys,
            "workload": self.cmd_workload,
            "flood": self.cmd_flood,
            "paced": self.cmd_paced,
            "spanwork": self.cmd_spanwork,
            "spanab": self.cmd_spanab,
            "rusage": self.cmd_rusage,
            "write_stderr": self.cmd_write_stderr,
            "stats": self.cmd_stats,
            "info": self.cmd_info,
            "threads": self.cmd_threads,
            "backend_stats": self.cmd_backend_stats,
            "wait_drained": self.cmd_wait_drained,
            "call": self.cmd_call,
            "gc": self.cmd_gc,
            "error": self.cmd_error,
        }

    def handle_line(self, line: str) -> None:
        """Run one command line and print its ACK (or an ``error`` ACK)."""
        try:
            cmd = json.loads(line)
            if not isinstance(cmd, dict):
                raise CommandError("command must be a JSON object")
            name = cmd.get("cmd")
            handler = self.handlers.get(name) if isinstance(name, str) else None
            if handler is None:
                raise CommandError(f"unknown command: {name!r}")
            result = handler(cmd)
        except Exception as exc:  # bad JSON, bad args, anything: report and go on
            self.ack("error", {"error": f"{type(exc).__name__}: {exc}"})
            return
        self.ack(name, result)

    def ack(self, name: str, result: Any) -> None:
        self.out.line(f"{ACK} {name} {json.dumps(result)}")

    def cmd_emit(self, cmd: dict[str, Any]) -> dict[str, Any]:
        event = cmd.get("event")
        count = _int_arg(cmd, "count", 1)
        measurements = cmd.get("measurements") or {}
        metadata = cmd.get("metadata")
        correlation_id = cmd.get("correlation_id")
        for _ in range(count):
            emit(event, measurements, metadata, correlation_id)
        return {"count": count}

    def cmd_span(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("name")
        fail = bool(cmd.get("fail", False))
        try:
            with span(name, _opt_dict(cmd, "metadata"), cmd.get("correlation_id")):
                if fail:
                    raise RuntimeError("span failure requested by the worker command")
        except RuntimeError:
            if not fail:
                raise
        return {"fail": fail}

    def cmd_spans(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("name", "python.call")
        count = _int_arg(cmd, "count", 1)
        prefix = cmd.get("correlation_prefix", "span")
        if not isinstance(name, str) or not isinstance(prefix, str):
            raise CommandError("'name' and 'correlation_prefix' must be strings")
        metadata = _opt_dict(cmd, "metadata")
        for i in range(count):
            with span(name, metadata, f"{prefix}-{i}"):
                pass
        return {"count": count}

    def cmd_emit_many(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Validate the whole list first, so a bad entry emits nothing at all."""
        events = cmd.get("events")
        repeat = _int_arg(cmd, "repeat", 1)
        if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
            raise CommandError("'events' must be a list of objects")
        calls = [
            (
                e.get("event"),
                e.get("measurements") or {},
                e.get("metadata"),
                e.get("correlation_id"),
            )
            for e in events
        ]
        for _ in range(repeat):
            for event, measurements, metadata, correlation_id in calls:
                emit(event, measurements, metadata, correlation_id)
        return {"count": len(calls) * repeat}

    def cmd_unknown(self, cmd: dict[str, Any]) -> dict[str, Any]:
        count = _int_arg(cmd, "count", 1)
        for _ in range(count):
            emit(f"zz.{_token()}.evt", {f"m_{_token()}": 1}, {f"k_{_token()}": "v"})
        return {"count": count}

    def cmd_unknown_keys(self, cmd: dict[str, Any]) -> dict[str, Any]:
        event = cmd.get("event", "python.call.stop")
        count = _int_arg(cmd, "count", 1)
        for _ in range(count):
            emit(event, {f"m_{_token()}": 1}, {f"k_{_token()}": "v"})
        return {"count": count}

    def cmd_flood(self, cmd: dict[str, Any]) -> dict[str, Any]:
        event = cmd.get("event", "python.call.stop")
        count = _int_arg(cmd, "count", 1)
        measurements = {"duration": 1}
        started = time.perf_counter()
        if cmd.get("seq"):
            # Numbered events (a "seq" measurement, 0..count-1), to check order.
            for i in range(count):
                emit(event, {"duration": 1, "seq": i})
        else:
            for _ in range(count):
                emit(event, measurements)
        return {"count": count, "seconds": time.perf_counter() - started}

    def cmd_paced(self, cmd: dict[str, Any]) -> dict[str, Any]:
        count = _int_arg(cmd, "count", 1000)
        rate = max(1, _int_arg(cmd, "rate", 1000))
        interval = 1.0 / rate
        started = time.perf_counter()
        for i in range(count):
            delay = started + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            emit("python.call.start", {"system_time": time.time_ns()})
        return {"count": count, "seconds": time.perf_counter() - started}

    def cmd_spanwork(self, cmd: dict[str, Any]) -> dict[str, Any]:
        calls = _int_arg(cmd, "calls", 1000)
        work_us = max(1, _int_arg(cmd, "work_us", 1000))
        traced = cmd.get("telemetry", True) is not False
        mode = cmd.get("mode", "spin")
        if mode not in ("spin", "sleep"):
            raise CommandError('\'mode\' must be "spin" or "sleep"')
        if mode == "spin":
            spins = self._spin_count(work_us)

            def work() -> None:
                _spin(spins)

        else:
            interval = work_us / 1e6
            started = time.perf_counter()
            done = 0

            def work() -> None:
                # On a fixed schedule, so both runs have the same call rate.
                nonlocal done
                done += 1
                delay = started + done * interval - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)

        wall = time.perf_counter()
        cpu = time.process_time()
        if traced:
            for _ in range(calls):
                with span("python.call", {"command": "predict"}):
                    work()
            self.stream.wait_drained(30)
        else:
            for _ in range(calls):
                work()
        return {
            "calls": calls,
            "cpu_s": time.process_time() - cpu,
            "wall_s": time.perf_counter() - wall,
        }

    def _spin_count(self, work_us: int) -> int:
        spins = self._spins.get(work_us)
        if spins is None:
            spins = self._spins[work_us] = _spins_for(work_us)
        return spins

    def cmd_spanab(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Busy calls with and without spans, in alternating blocks (see the module doc)."""
        calls = _int_arg(cmd, "calls", 1000)
        work_us = max(1, _int_arg(cmd, "work_us", 1000))
        block = max(1, _int_arg(cmd, "block", 20))
        first = cmd.get("first", "off")
        if first not in ("off", "on"):
            raise CommandError('\'first\' must be "off" or "on"')
        spins = self._spin_count(work_us)
        blocks = max(1, calls // block)
        a = first == "on"
        # ABBA order: a drift over the run costs both sides the same.
        order = [x for i in range(blocks) for x in ((a, not a) if i % 2 == 0 else (not a, a))]
        process = {True: 0.0, False: 0.0}
        calling = {True: 0.0, False: 0.0}
        draining = 0.0
        # What sending cost the calling thread itself (the native stream's
        # server lets an emit send a due batch; see server_rounds).
        rounds = getattr(self.stream, "server_rounds", lambda: None)
        inline_ns = 0
        process_time, thread_time = time.process_time, time.thread_time
        wall = time.perf_counter()
        for traced in order:
            process0, thread0 = process_time(), thread_time()
            if traced:
                before = rounds()
                for _ in range(block):
                    with span("python.call", {"command": "predict"}):
                        _spin(spins)
                # The block's telemetry work is done in the block, not left to the next.
                drain0 = thread_time()
                self.stream.wait_drained(30)
                draining += thread_time() - drain0
                after = rounds()
                if before is not None and after is not None:
                    inline_ns += after["emitter_ns"] - before["emitter_ns"]
            else:
                for _ in range(block):
                    _spin(spins)
            process[traced] += process_time() - process0
            calling[traced] += thread_time() - thread0
        return {
            "calls": blocks * block,
            "blocks": blocks,
            "cpu_on_s": process[True],
            "cpu_off_s": process[False],
            "calling_on_s": calling[True],
            "calling_off_s": calling[False],
            "calling_drain_s": draining,
            "calling_inline_s": inline_ns / 1e9,
            "wall_s": time.perf_counter() - wall,
        }

    def cmd_rusage(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        with open("/proc/self/statm") as statm:
            resident_pages = int(statm.read().split()[1])
        return {
            "cpu_s": time.process_time(),
            "rss_kb": resident_pages * os.sysconf("SC_PAGE_SIZE") // 1024,
        }

    def cmd_threads(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        """Per thread of this process (Linux ``/proc``): CPU and context switches."""
        ticks = os.sysconf("SC_CLK_TCK")
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/self/task/{tid}/status") as f:
                    status = dict(
                        line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line
                    )
            except OSError:
                continue  # the thread ended meanwhile
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2 :].split()
            cpu_s = (int(fields[11]) + int(fields[12])) / ticks
            # Nanoseconds on the CPU, where the kernel keeps scheduler statistics.
            with (
                contextlib.suppress(OSError, ValueError, IndexError),
                open(f"/proc/self/task/{tid}/schedstat") as f,
            ):
                cpu_s = int(f.read().split()[0]) / 1e9
            out[tid] = {
                "name": name,
                "cpu_s": cpu_s,
                "voluntary": int(status.get("voluntary_ctxt_switches", "0")),
                "involuntary": int(status.get("nonvoluntary_ctxt_switches", "0")),
            }
        return out

    def cmd_write_stderr(self, cmd: dict[str, Any]) -> dict[str, Any]:
        parts = cmd.get("parts")
        if not isinstance(parts, list) or not all(isinstance(p, dict) for p in parts):
            raise CommandError("'parts' must be a list of objects")
        data = b"".join(
            bytes.fromhex(str(p.get("hex", ""))) * _int_arg(p, "repeat", 1) for p in parts
        )
        sys.stderr.flush()
        sys.stderr.buffer.write(data)
        sys.stderr.buffer.flush()
        return {"bytes": len(data)}

    def cmd_stats(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            **self.stream.stats(),
            "control": self.stream.control_state(),
            "implementation": _implementation_of(self.stream),
        }

    def cmd_info(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        return {
            "implementation": _implementation_of(self.stream),
            "telemetry_address": self.telemetry_address,
            "grpc_address": self.address,
            "serving": "grpcio" if self.telemetry_address == self.address else "rust",
        }

    def cmd_backend_stats(self, _cmd: dict[str, Any]) -> dict[str, Any]:
        return backend_stats()

    def cmd_wait_drained(self, cmd: dict[str, Any]) -> dict[str, Any]:
        timeout_ms = _int_arg(cmd, "timeout_ms", 5000)
        return {"drained": self.stream.wait_drained(timeout_ms / 1000)}

    def cmd_call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        payload = cmd.get("payload", "hello")
        correlation_id = cmd.get("correlation_id")
        if not isinstance(payload, str):
            raise CommandError("'payload' must be a string")
        if correlation_id is not None and not isinstance(correlation_id, str):
            raise CommandError("'correlation_id' must be a string or null")
        if self.address is None:
            raise CommandError("the worker has no server address to call")
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        rpc = self._channel.unary_unary(PING_METHOD)
        metadata = [(CORRELATION_HEADER, correlation_id)] if correlation_id is not None else None
        try:
            rpc(payload.encode(), metadata=metadata, timeout=CALL_TIMEOUT_S)
        except grpc.RpcError:
            return {"ok": False}
        return {"ok": True}

    def cmd_gc(self, cmd: dict[str, Any]) -> dict[str, Any]:
        generation = _int_arg(cmd, "generation", 2)
        if generation > 2:
            raise CommandError("'generation' must be 0, 1 or 2")
        collected = gc.collect(generation)
        flush_gc_events()
        return {"collected": collected}

    def cmd_error(self, cmd: dict[str, Any]) -> dict[str, Any]:
        name = cmd.get("tool", "failing_tool")
        correlation_id = cmd.get("correlation_id")
        if not isinstance(name, str):
            raise CommandError("'tool' must be a string")

        @tool(name)
        def failing() -> None:
            raise _SyntheticFailure(f"tool {name} failed on request")

        with correlation.correlation(correlation_id), contextlib.suppress(_SyntheticFailure):
            failing()
        return {"reported": True}

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def cmd_workload(self, cmd: dict[str, Any]) -> dict[str, Any]:
        calls = _int_arg(cmd, "calls", 10)
        interval_ms = _int_arg(cmd, "interval_ms", 0)
        prefix = cmd.get("correlation_prefix") or "workload"
        if not isinstance(prefix, str):
            raise CommandError("'correlation_prefix' must be a string")
        threading.Thread(
            target=self._workload,
            args=(calls, interval_ms / 1000, prefix),
            name="snakepit-telemetry-workload",
            daemon=True,
        ).start()
        return {"started": True}

    def _workload(self, calls: int, interval_s: float, prefix: str) -> None:
        """Synthetic calls; every 10th fails in the tool, so the call fails too."""
        for i in range(calls):
            with contextlib.suppress(_SyntheticFailure):
                self._workload_call(i, f"{prefix}-{i}")
            if interval_s > 0 and i + 1 < calls:
                time.sleep(interval_s)
        self.out.line(f"{WORKLOAD_DONE} {json.dumps({'calls': calls})}")

    @staticmethod
    def _workload_call(i: int, correlation_id: str) -> None:
        with (
            span("python.call", {"command": "predict"}, correlation_id=correlation_id),
            span("tool.execution", {"tool": "tokenize"}),
        ):
            emit("tool.result_size", {"bytes": random.randint(64, 65536)}, {"tool": "tokenize"})
            if (i + 1) % 10 == 0:
                raise _SyntheticFailure(f"synthetic tool failure in call {i}")


def _spin(n: int) -> int:
    """Pure-Python CPU work: ``n`` loop iterations."""
    total = 0
    for i in range(n):
        total += i
    return total


def _spins_for(work_us: int) -> int:
    """Iterations of :func:`_spin` that take about ``work_us`` microseconds here."""
    probe = 200_000
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        _spin(probe)
        best = min(best, time.perf_counter() - started)
    return max(1, int(probe * work_us / 1e6 / best))


def _implementation_of(stream: Any) -> str:
    """``"native"`` or ``"python"``: the implementation of ``stream``."""
    name = getattr(stream, "implementation", None)
    return name if isinstance(name, str) else telemetry_implementation()


def _serve_native(opts: argparse.Namespace, out: Output) -> str | None:
    """Start the Rust telemetry server if asked to; its bound address, or ``None``.

    ``--telemetry-listen`` must succeed (``SystemExit`` otherwise); the
    environment's ``SNAKEPIT_TELEMETRY_LISTEN`` falls back to the grpcio server
    with a warning line when the python implementation runs.
    """
    if opts.telemetry_listen is not None:
        try:
            return serve(opts.telemetry_listen)
        except (RuntimeError, OSError, ValueError) as exc:
            raise SystemExit(f"--telemetry-listen {opts.telemetry_listen}: {exc}") from None
    if not os.environ.get(LISTEN_ENV, "").strip():
        return None
    try:
        return serve()
    except RuntimeError as exc:  # the python implementation: serve through grpcio
        out.line(f"{LOG} WARNING {LISTEN_ENV} ignored: {exc}".replace("\n", " "))
        return None
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{LISTEN_ENV}={os.environ[LISTEN_ENV]}: {exc}") from None


def _bind(server: grpc.Server, listen: str) -> str:
    """Bind ``listen`` and return the address to advertise in the READY line.

    ``telemetry.add_port``: a ``unix:`` socket is made 0600 in a 0700 directory.
    """
    try:
        return add_port(server, listen)
    except ValueError as exc:
        raise SystemExit(f"--listen: {exc}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="command_worker.py")
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT or unix:/abs/path")
    parser.add_argument("--queue-size", type=int, default=None, help="telemetry queue bound")
    parser.add_argument(
        "--telemetry-listen",
        default=None,
        metavar="ADDRESS",
        help="serve telemetry from the Rust server (native implementation) on HOST:PORT or "
        "unix:/abs/path, and announce that address",
    )
    parser.add_argument("--max-workers", type=int, default=8, help="gRPC thread pool size")
    parser.add_argument(
        "--samplers",
        type=int,
        nargs="?",
        const=-1,
        default=None,
        metavar="MS",
        help="start memory/CPU samplers every MS ms (no value: from the environment)",
    )
    parser.add_argument(
        "--backend",
        default=None,
        metavar="NAME",
        help="telemetry backend(s): grpc|stderr|otel|statsd|none or a comma list",
    )
    parser.add_argument(
        "--gc-events", action="store_true", help="emit python.gc.completed per collection"
    )
    parser.add_argument(
        "--commands",
        action="append",
        default=[],
        metavar="FILE",
        help="add the commands of FILE's COMMANDS dict (repeatable)",
    )
    parser.add_argument(
        "--wire",
        choices=("batches", "single"),
        default="batches",
        help="offer StreamTelemetryBatches too (default), or only the plain StreamTelemetry",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None, stdin: TextIO | None = None) -> int:
    """Serve until stdin closes or an ``exit`` command arrives; return the exit code."""
    opts = parse_args(argv)
    stdin = stdin if stdin is not None else sys.stdin
    out = Output(sys.stdout)
    package_log = logging.getLogger("snakepit_telemetry")
    package_log.addHandler(_LogLines(out))
    package_log.propagate = False
    stream = new_stream(opts.queue_size)
    set_stream(stream)

    executor = futures.ThreadPoolExecutor(max_workers=max(1, opts.max_workers))
    server = grpc.server(
        executor, interceptors=[TelemetryInterceptor()], options=list(SERVER_OPTIONS)
    )
    add_to_server(server, stream, batches=opts.wire == "batches")
    add_ping(server)
    if opts.backend is not None:
        set_backend(opts.backend)
    try:
        address = _bind(server, opts.listen)
    except RuntimeError as exc:  # grpc raises when the address cannot be bound
        print(f"could not bind {opts.listen}: {exc}", file=sys.stderr)
        return 1
    server.start()
    try:
        telemetry_address = _serve_native(opts, out)
    except SystemExit as exc:
        print(exc, file=sys.stderr)
        server.stop(None)
        return 1
    worker = Worker(stream, out, address, telemetry_address)
    for path in opts.commands:
        worker.handlers.update(runpy.run_path(path)["COMMANDS"])
    if opts.samplers is not None:
        start_samplers(None if opts.samplers < 0 else opts.samplers / 1000)
    if opts.gc_events or gc_events_from_env():
        install_gc_hook()
    try:
        out.line(f"{READY} {worker.telemetry_address}")
        while True:
            line = stdin.readline()
            if not line:
                break  # EOF: the parent is gone or done with us
            line = line.strip()
            if not line:
                continue
            if _is_exit(line):
                worker.ack("exit", {"exit": True})
                break
            worker.handle_line(line)
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        stop_samplers()
        uninstall_gc_hook()
        worker.close()
        with contextlib.suppress(Exception):
            get_backend().close()  # flushes queued stderr lines before os._exit
        stream.close()
        if telemetry_address is not None:
            stream.stop_serving()
        server.stop(STOP_GRACE_S).wait(STOP_GRACE_S + 1.0)
        executor.shutdown(wait=False, cancel_futures=True)
        for listen in (opts.listen, telemetry_address or ""):
            if listen.startswith("unix:"):
                _unlink_quietly(listen[len("unix:") :])
    return 0


def _is_exit(line: str) -> bool:
    try:
        cmd = json.loads(line)
    except ValueError:
        return False
    return isinstance(cmd, dict) and cmd.get("cmd") == "exit"


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


if __name__ == "__main__":
    code = main()
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    # os._exit skips joining the gRPC pool threads at interpreter exit: a handler
    # still blocked in a client send must not keep the process alive.
    os._exit(code)
