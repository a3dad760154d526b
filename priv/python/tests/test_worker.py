"""The command worker (``support/python/command_worker.py``, test/demo/bench support, not
part of the package) as a subprocess, driven over stdin and read by a real client."""

from __future__ import annotations

import json
import math
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb

from .conftest import PY_ROOT, BatchClient, Client, wait_until

# The checkout's support/python (priv/python/tests -> the repository root).
COMMAND_WORKER = PY_ROOT.parent.parent / "support" / "python" / "command_worker.py"
HOSTILE_COMMANDS = PY_ROOT.parent.parent / "test" / "support" / "python" / "hostile_commands.py"
READY = "SNAKEPIT_TELEMETRY_READY "
ACK = "SNAKEPIT_TELEMETRY_ACK "
LOG = "SNAKEPIT_TELEMETRY_LOG "


class WorkerProc:
    """A worker subprocess with line-oriented, timeout-aware stdout reading."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, stderr: int | None = None
    ) -> None:
        env = dict(os.environ, PYTHONPATH=str(PY_ROOT), **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, str(COMMAND_WORKER), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        ready = self.line()
        assert ready.startswith(READY), ready
        self.address = ready[len(READY) :]

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def line(self, timeout: float = 10.0) -> str:
        """The next line that is not one of the package's log lines.

        Those (e.g. the "without a secret" warning of a client's first call)
        come whenever the package logs, between any two other lines.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail("worker printed nothing in time")
            if not line.startswith(LOG):
                return line

    def command(self, cmd: dict[str, Any] | str) -> tuple[str, Any]:
        """Send one command; return ``(ack name, decoded result)``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write((cmd if isinstance(cmd, str) else json.dumps(cmd)) + "\n")
        self.proc.stdin.flush()
        line = self.line()
        assert line.startswith(ACK), line
        name, payload = line[len(ACK) :].split(" ", 1)
        return name, json.loads(payload)

    def close_stdin(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(timeout=5)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def worker() -> Iterator[WorkerProc]:
    w = WorkerProc("--listen", "127.0.0.1:0", "--queue-size", "256")
    yield w
    w.kill()


def test_ready_line_address(worker: WorkerProc) -> None:
    host, port = worker.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0


def test_emit_and_receive(worker: WorkerProc) -> None:
    cmd = {
        "cmd": "emit",
        "event": "python.call.stop",
        "measurements": {"duration": 12, "ratio": 0.25},
        "metadata": {"command": "predict"},
        "correlation_id": "abc",
        "count": 3,
    }
    assert worker.command(cmd) == ("emit", {"count": 3})
    client = Client(worker.address)
    try:
        events = client.take(3)
        assert all(list(e.event_parts) == ["python", "call", "stop"] for e in events)
        assert events[0].measurements["duration"].int_value == 12
        assert events[0].measurements["ratio"].float_value == 0.25
        assert dict(events[0].metadata) == {"command": "predict"}
        assert events[0].correlation_id == "abc"
        assert worker.command({"cmd": "wait_drained", "timeout_ms": 3000}) == (
            "wait_drained",
            {"drained": True},
        )
        name, st = worker.command({"cmd": "stats"})
        assert name == "stats" and st["sent"] == 3 and st["active_stream"] is True

        _, result = worker.command({"cmd": "span", "name": "tool.execution", "fail": True})
        assert result == {"fail": True}
        assert [".".join(e.event_parts) for e in client.take(2)] == [
            "tool.execution.start",
            "tool.execution.exception",
        ]

        worker.command({"cmd": "unknown", "count": 2})
        unknown = client.take(2)
        assert (
            unknown[0].event_parts[0] == "zz" and unknown[0].event_parts != unknown[1].event_parts
        )
        worker.command({"cmd": "unknown_keys", "event": "python.call.stop", "count": 2})
        a, b = client.take(2)
        assert set(a.metadata) != set(b.metadata) and set(a.measurements) != set(b.measurements)
    finally:
        client.close()


def test_workload(worker: WorkerProc) -> None:
    client = Client(worker.address)
    try:
        cmd = {"cmd": "workload", "calls": 10, "interval_ms": 1, "correlation_prefix": "demo"}
        assert worker.command(cmd) == ("workload", {"started": True})
        assert worker.line() == 'SNAKEPIT_TELEMETRY_WORKLOAD_DONE {"calls": 10}'
        events = client.take(50)  # 5 per call: 2 starts, result, 2 stop/exception
        names = [".".join(e.event_parts) for e in events]
        assert names.count("python.call.start") == 10
        assert names.count("tool.execution.exception") == 1
        assert names.count("python.call.exception") == 1
        assert {e.correlation_id for e in events if e.event_parts[0] == "python"} == {
            f"demo-{i}" for i in range(10)
        }
    finally:
        client.close()


def test_flood_and_errors(worker: WorkerProc) -> None:
    name, result = worker.command({"cmd": "flood", "event": "python.call.stop", "count": 1000})
    assert name == "flood" and result["count"] == 1000 and result["seconds"] >= 0
    _, st = worker.command({"cmd": "stats"})
    assert st["enqueued"] == 256 and st["dropped_queue_full"] == 744
    assert worker.command("not json")[0] == "error"
    name, result = worker.command({"cmd": "bogus"})
    assert name == "error" and "bogus" in result["error"]
    assert worker.command({"cmd": "emit", "event": "a.b", "count": "x"})[0] == "error"
    assert worker.command({"cmd": "stats"})[0] == "stats"  # still alive


def test_exit_on_stdin_eof(worker: WorkerProc) -> None:
    client = Client(worker.address)  # an open stream must not keep it alive
    try:
        assert worker.close_stdin() == 0
    finally:
        client.close()


def test_exit_command() -> None:
    w = WorkerProc()
    try:
        assert w.command({"cmd": "exit"}) == ("exit", {"exit": True})
        assert w.proc.wait(timeout=5) == 0
    finally:
        w.kill()


def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "telemetry.sock"
    w = WorkerProc("--listen", f"unix:{sock}")
    try:
        assert w.address == f"unix:{sock}"
        w.command({"cmd": "emit", "event": "over.unix", "measurements": {"x": 1}})
        client = Client(w.address)
        try:
            assert list(client.take(1)[0].event_parts) == ["over", "unix"]
        finally:
            client.close()
        assert w.close_stdin() == 0
        assert not sock.exists()
    finally:
        w.kill()


def sampling(rate: float, *patterns: str) -> pb.TelemetryControl:
    return pb.TelemetryControl(
        sampling=pb.TelemetrySamplingUpdate(sampling_rate=rate, event_patterns=patterns)
    )


def test_spans_command(worker: WorkerProc) -> None:
    client = Client(worker.address)
    try:
        cmd = {"cmd": "spans", "name": "python.call", "count": 5, "correlation_prefix": "p"}
        assert worker.command(cmd) == ("spans", {"count": 5})
        events = client.take(10)
        assert [".".join(e.event_parts) for e in events[:2]] == [
            "python.call.start",
            "python.call.stop",
        ]
        assert [e.correlation_id for e in events] == [f"p-{i // 2}" for i in range(10)]
        assert worker.command({"cmd": "spans", "name": 3})[0] == "error"
    finally:
        client.close()


def test_spans_whole_under_sampling(worker: WorkerProc) -> None:
    client = Client(worker.address)
    try:
        client.send(sampling(0.5, "python.call.*"))
        assert wait_until(lambda: worker.command({"cmd": "stats"})[1]["control"]["rules"])
        _, st = worker.command({"cmd": "stats"})
        assert st["control"]["rules"] == [{"rate": 0.5, "patterns": ["python.call.*"]}]
        for batch in range(4):  # 4 x 100 spans fits the 256-event queue
            cmd = {"cmd": "spans", "count": 100, "correlation_prefix": f"b{batch}"}
            worker.command(cmd)
            _, drained = worker.command({"cmd": "wait_drained", "timeout_ms": 5000})
            assert drained == {"drained": True}
        _, st = worker.command({"cmd": "stats"})
        assert st["dropped_queue_full"] == 0
        total = st["sent"]
        events = client.take(total)
        starts = {e.correlation_id for e in events if e.event_parts[-1] == "start"}
        stops = {e.correlation_id for e in events if e.event_parts[-1] == "stop"}
        assert starts == stops and 2 * len(starts) == total
        assert 120 <= len(starts) <= 280  # Binomial(400, 0.5): sd 10
    finally:
        client.close()


def test_emit_many_command(worker: WorkerProc) -> None:
    cmd = {
        "cmd": "emit_many",
        "events": [
            {"event": "a.one", "measurements": {"x": 1}, "correlation_id": "c1"},
            {"event": "b.two", "metadata": {"k": "v"}},
        ],
        "repeat": 3,
    }
    assert worker.command(cmd) == ("emit_many", {"count": 6})
    client = Client(worker.address)
    try:
        events = client.take(6)
        assert [".".join(e.event_parts) for e in events] == ["a.one", "b.two"] * 3
        assert events[0].correlation_id == "c1" and events[0].measurements["x"].int_value == 1
        assert dict(events[1].metadata) == {"k": "v"}
    finally:
        client.close()
    bad = {"cmd": "emit_many", "events": [{"event": "a.b"}, 5]}
    assert worker.command(bad)[0] == "error"
    assert worker.command({"cmd": "emit_many", "events": "x"})[0] == "error"
    assert worker.command({"cmd": "emit_many", "events": [], "repeat": 4}) == (
        "emit_many",
        {"count": 0},
    )
    _, st = worker.command({"cmd": "stats"})
    assert st["emitted"] == 6  # nothing from the rejected commands


def test_stats_control_and_env() -> None:
    env = {
        "SNAKEPIT_TELEMETRY_SAMPLING_RATE": "0.5",
        "SNAKEPIT_TELEMETRY_DENY": "noisy.*",
        "SNAKEPIT_TELEMETRY_ENABLED": "bogus",
        "SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS": "100",
    }
    w = WorkerProc(env=env)
    try:
        _, st = w.command({"cmd": "stats"})
        assert st["control"] == {
            "enabled": True,
            "default_rate": 0.5,
            "rules": [],
            "allow": [],
            "deny": ["noisy.*"],
        }
        client = Client(w.address)
        try:
            _, report = client.take_stats()
            assert report.measurements["emitted"].int_value == 0
            w.command({"cmd": "emit", "event": "noisy.evt", "count": 2})
            _, report = client.take_stats()
            assert report.measurements["dropped_filtered"].int_value == 2
        finally:
            client.close()
        assert wait_until(lambda: w.command({"cmd": "stats"})[1]["stats_reports"] == 2)
    finally:
        w.kill()


def take_until(client: Client, want: set[str], timeout: float = 5.0) -> list[pb.TelemetryEvent]:
    """Events until every name in ``want`` was seen (others, e.g. samples, included)."""
    got: list[pb.TelemetryEvent] = []
    deadline = time.monotonic() + timeout
    while not want <= {".".join(e.event_parts) for e in got}:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"missing {want - {'.'.join(e.event_parts) for e in got}}")
        try:
            got.append(client.events.get(timeout=remaining))
        except queue.Empty:
            continue
    return got


def named(events: list[pb.TelemetryEvent], name: str) -> list[pb.TelemetryEvent]:
    return [e for e in events if ".".join(e.event_parts) == name]


def test_call_gc_error_samplers_commands() -> None:
    w = WorkerProc("--samplers", "50", "--gc-events")
    client = Client(w.address)
    try:
        assert w.command({"cmd": "call", "payload": "hello", "correlation_id": "abc"}) == (
            "call",
            {"ok": True},
        )
        events = take_until(client, {"python.call.stop", "tool.result_size"})
        (start,) = named(events, "python.call.start")
        (size,) = named(events, "tool.result_size")
        (stop,) = named(events, "python.call.stop")
        assert dict(start.metadata) == {"rpc_method": "/snakepit.bridge.BridgeService/Ping"}
        assert size.measurements["bytes"].int_value == 5 and dict(size.metadata) == {"tool": "ping"}
        assert dict(stop.metadata)["result"] == "success"
        assert {start.correlation_id, size.correlation_id, stop.correlation_id} == {"abc"}

        assert w.command({"cmd": "call", "payload": "fail"}) == ("call", {"ok": False})
        (exc,) = named(take_until(client, {"python.call.exception"}), "python.call.exception")
        assert dict(exc.metadata) == {
            "rpc_method": "/snakepit.bridge.BridgeService/Ping",
            "error_type": "ValueError",
            "error_message": "ping asked to fail",
        }
        assert exc.correlation_id == ""

        name, result = w.command({"cmd": "gc"})
        assert name == "gc" and result["collected"] >= 0
        # Automatic young-generation collections may be reported first; the
        # command's full collection (generation 2) must follow.
        gc_events = named(take_until(client, {"python.gc.completed"}), "python.gc.completed")
        while "2" not in {e.metadata["generation"] for e in gc_events}:
            gc_events += named(take_until(client, {"python.gc.completed"}), "python.gc.completed")
        assert set(gc_events[0].measurements) == {"duration", "collected", "uncollectable"}

        assert w.command({"cmd": "error", "tool": "t", "correlation_id": "e"}) == (
            "error",
            {"reported": True},
        )
        events = take_until(client, {"tool.execution.exception", "python.error.occurred"})
        (error,) = named(events, "python.error.occurred")
        assert error.metadata["tool"] == "t" and error.correlation_id == "e"
        assert error.measurements["system_time"].int_value > 0

        events = take_until(client, {"python.memory.sampled", "python.cpu.sampled"})
        (mem, *_) = named(events, "python.memory.sampled")
        assert mem.measurements["rss_bytes"].int_value > 0
        (cpu, *_) = named(events, "python.cpu.sampled")
        assert cpu.measurements["cpu_percent"].WhichOneof("value") == "float_value"
    finally:
        client.close()
        w.kill()


def test_gc_events_env_and_hostile() -> None:
    w = WorkerProc(
        "--queue-size",
        "256",
        "--commands",
        str(HOSTILE_COMMANDS),
        env={"SNAKEPIT_TELEMETRY_GC_EVENTS": "true"},
    )
    try:
        assert w.command({"cmd": "gc", "generation": 0})[0] == "gc"
        _, st = w.command({"cmd": "stats"})
        assert st["emitted"] >= 1  # the collection's python.gc.completed
        cmd = {"cmd": "hostile", "count": 80, "seed": 7, "invalid": 4}
        name, result = w.command(cmd)
        assert name == "hostile"
        assert result == {
            "count": 80,
            "kinds": {"unknown_name": 20, "unknown_keys": 20, "oversized": 20, "bad_values": 20},
            "invalid": 4,
        }
        _, again = w.command({"cmd": "hostile", "count": 3, "seed": 1})
        assert again == {
            "count": 3,
            "kinds": {"unknown_name": 1, "unknown_keys": 1, "oversized": 1, "bad_values": 0},
        }
        _, after = w.command({"cmd": "stats"})
        assert after["dropped_invalid"] == 4
        assert after["emitted"] - st["emitted"] == 80 + 4 + 3
        client = Client(w.address)
        try:
            events = [
                e
                for e in client.take(after["enqueued"])
                if e.event_parts[0] != "python" or e.event_parts[1] != "gc"
            ]
        finally:
            client.close()
        assert len(events) == 83
        lengths = {len(e.event_parts) for e in events}
        assert lengths == {3, 20}
        unknown = [tuple(e.event_parts) for e in events if e.event_parts[0] != "python"]
        assert len(unknown) == len(set(unknown)) == 21  # all distinct
        stops = [e for e in events if list(e.event_parts) == ["python", "call", "stop"]]
        assert any(len(e.metadata.get("command", "")) == 100_000 for e in stops)
        assert any(len(k) == 10_000 for e in stops for k in e.metadata)
        assert any(math.isnan(e.measurements["duration"].float_value) for e in stops)
        assert any(
            e.measurements["pos_inf"].float_value == math.inf
            for e in stops
            if "pos_inf" in e.measurements
        )
        assert w.command({"cmd": "hostile", "seed": "x"})[0] == "error"
    finally:
        w.kill()


def test_hostile_is_a_test_support_command(worker: WorkerProc) -> None:
    """Without ``--commands`` (as the demo and the benchmarks run it) there is no ``hostile``."""
    name, result = worker.command({"cmd": "hostile", "count": 1})
    assert name == "error" and "unknown command" in result["error"]


def test_backend_flag_stderr_lines_and_stats() -> None:
    """``--backend stderr,grpc``: JSON lines on the worker's stderr and on the stream."""
    w = WorkerProc("--backend", "stderr,grpc", stderr=subprocess.PIPE)
    try:
        cmd = {
            "cmd": "emit",
            "event": "python.call.stop",
            "measurements": {"duration": 5},
            "metadata": {"command": "predict"},
            "correlation_id": "w1",
            "count": 2,
        }
        assert w.command(cmd) == ("emit", {"count": 2})
        name, stats = w.command({"cmd": "backend_stats"})
        assert name == "backend_stats" and set(stats) == {"stderr", "grpc"}
        assert stats["stderr"]["emitted"] == 2 and stats["grpc"]["emitted"] == 2
        assert w.command({"cmd": "exit"})[0] == "exit"
        assert w.proc.wait(timeout=5) == 0
        assert w.proc.stderr is not None
        lines = [ln for ln in w.proc.stderr.read().splitlines() if ln]
    finally:
        w.kill()
    assert len(lines) == 2
    prefix, body = lines[0].split(" ", 1)
    assert prefix == "SNAKEPIT_TELEMETRY_EVENT"
    event = json.loads(body)
    assert event["event_parts"] == ["python", "call", "stop"]
    assert event["measurements"] == {"duration": 5} and event["correlation_id"] == "w1"


def test_backend_default_is_grpc_and_env_is_honoured() -> None:
    w = WorkerProc(env={"SNAKEPIT_TELEMETRY_BACKEND": "none"})
    try:
        assert w.command({"cmd": "backend_stats"})[1] == {
            "none": {"emitted": 0, "dropped": 0, "errors": 0}
        }
    finally:
        w.kill()
    w = WorkerProc()
    try:
        assert set(w.command({"cmd": "backend_stats"})[1]) == {"grpc"}
    finally:
        w.kill()


def test_wire_single_offers_no_batches() -> None:
    """``--wire single``: only StreamTelemetry, so Elixir falls back to it."""
    w = WorkerProc("--wire", "single")
    batched = BatchClient(w.address)
    single = Client(w.address)
    try:
        assert batched.done.wait(5)
        assert batched.error is not None
        assert batched.error.code() == grpc.StatusCode.UNIMPLEMENTED
        w.command({"cmd": "emit", "event": "over.single", "measurements": {"x": 1}, "count": 2})
        assert [list(e.event_parts) for e in single.take(2)] == [["over", "single"]] * 2
        _, st = w.command({"cmd": "stats"})
        assert st["batches_sent"] == 0
    finally:
        batched.close()
        single.close()
        w.kill()


def test_wire_batches_by_default(worker: WorkerProc) -> None:
    client = BatchClient(worker.address)
    try:
        cmd = {
            "cmd": "emit",
            "event": "python.call.stop",
            "measurements": {"duration": 12},
            "metadata": {"command": "predict"},
            "correlation_id": "abc",
            "count": 3,
        }
        assert worker.command(cmd) == ("emit", {"count": 3})
        events = client.take(3)
        assert all(list(e.event_parts) == ["python", "call", "stop"] for e in events)
        assert events[0].measurements["duration"].int_value == 12
        assert dict(events[0].metadata) == {"command": "predict"}
        assert events[0].correlation_id == "abc" and events[0].timestamp_ns > 0
        assert client.stats_batches  # the report at call start, as a batch
        assert wait_until(
            lambda: worker.command({"cmd": "stats"})[1]["batches_sent"] == len(client.batches)
        )
        _, st = worker.command({"cmd": "stats"})
        assert st["sent"] == 3 and client.error is None
    finally:
        client.close()


def test_benchmark_commands(worker: WorkerProc) -> None:
    client = BatchClient(worker.address)
    try:
        before = time.time_ns()
        name, paced = worker.command({"cmd": "paced", "count": 20, "rate": 200})
        assert name == "paced" and paced["count"] == 20
        assert paced["seconds"] >= 19 / 200  # the schedule spaces the emits
        events = client.take(20)
        stamps = [e.measurements["system_time"].int_value for e in events]
        assert all(list(e.event_parts) == ["python", "call", "start"] for e in events)
        assert before <= stamps[0] and stamps == sorted(stamps)

        _, off = worker.command({"cmd": "spanwork", "calls": 5, "work_us": 500, "telemetry": False})
        _, on = worker.command({"cmd": "spanwork", "calls": 5, "work_us": 500})
        assert off["calls"] == on["calls"] == 5 and off["cpu_s"] > 0 and on["cpu_s"] > 0
        spans = client.take(10)
        assert [".".join(e.event_parts) for e in spans] == [
            "python.call.start",
            "python.call.stop",
        ] * 5

        _, usage = worker.command({"cmd": "rusage"})
        assert usage["cpu_s"] > 0 and usage["rss_kb"] > 1000
    finally:
        client.close()
