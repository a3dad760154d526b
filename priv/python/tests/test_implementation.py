"""Choosing the implementation, the fallback to pure Python, and what only the native one does:
``telemetry.serve`` (a gRPC server on Rust threads), emit not keeping the caller's dicts."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry import backends
from snakepit_telemetry.telemetry._internal import implementation

from .conftest import NATIVE, PY_ROOT, BatchClient, Client, start_serving, wait_until

ENV = implementation.IMPLEMENTATION_ENV


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter with the package on the path; fails the test on error."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEPIT_TELEMETRY_")}
    full_env.update(env or {}, PYTHONPATH=str(PY_ROOT))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


REPORT = """
    import json, logging
    logging.basicConfig(level=logging.WARNING)
    from snakepit_telemetry import telemetry
    from snakepit_telemetry.telemetry._internal import core, implementation
    native = implementation.native()
    stream = telemetry.get_stream()
    print(json.dumps({
        "implementation": telemetry.implementation(),
        "stream": type(stream).__name__,
        "emit_is_native": native is not None and telemetry.emit is native.emit,
    }))
"""


def built() -> bool:
    """Whether the extension is there to import (without importing it here)."""
    return NATIVE or importlib.util.find_spec("snakepit_telemetry._native") is not None


def test_implementation_names_the_default_stream() -> None:
    assert telemetry.implementation() == ("native" if NATIVE else "python")
    s = telemetry.new_stream(queue_size=8)
    assert type(s) is (telemetry.NativeTelemetryStream if NATIVE else telemetry.TelemetryStream)
    assert s.implementation == telemetry.implementation()
    telemetry.set_stream(s)
    assert telemetry.implementation() == s.implementation
    # A pure stream chosen explicitly is served by the pure path, even here.
    pure = telemetry.TelemetryStream(queue_size=8)
    telemetry.set_stream(pure)
    assert telemetry.implementation() == "python"
    backends.set_backend("grpc")
    telemetry.emit("pure.evt", {"x": 1})
    with telemetry.span("pure.span"):
        pass
    assert [".".join(e.parts) for e in pure.drain_queued()] == [
        "pure.evt",
        "pure.span.start",
        "pure.span.stop",
    ]
    assert s.drain_queued() == []


@pytest.mark.parametrize("value", ["python", "auto", "", "native", "bogus", " Native "])
def test_env_switch(value: str) -> None:
    done = run_python(REPORT, {ENV: value})
    report = json.loads(done.stdout)
    native = value.strip().lower() != "python" and built()
    assert report == {
        "implementation": "native" if native else "python",
        "stream": "NativeTelemetryStream" if native else "TelemetryStream",
        "emit_is_native": native,
    }
    # Only asking for native where it is not built warns (once).
    warned = value.strip().lower() == "native" and not built()
    assert done.stderr.count("using the python implementation") == warned, done.stderr


BLOCKER = """
    import sys

    class Blocker:
        # Stands for a machine where the extension is not built.
        def find_spec(self, name, path=None, target=None):
            if name == "snakepit_telemetry._native":
                raise ImportError("blocked by the test")
            return None

    sys.meta_path.insert(0, Blocker())
"""


@pytest.mark.parametrize("value", ["native", "auto"])
def test_fallback_when_the_extension_cannot_be_imported(value: str) -> None:
    code = (
        BLOCKER
        + REPORT
        + """
    stream.emit_event("fallback.evt", {"x": 1})
    telemetry.set_stream(stream)
    telemetry.emit("fallback.emit", {"y": 2})
    with telemetry.span("fallback.span"):
        pass
    print(json.dumps([".".join(e.parts) for e in stream.drain_queued()]))
    try:
        telemetry.serve("127.0.0.1:0")
    except RuntimeError as exc:
        print(json.dumps(str(exc)))
    try:
        telemetry.NativeTelemetryStream()
    except RuntimeError as exc:
        print(json.dumps(str(exc)))
    """
    )
    done = run_python(code, {ENV: value})
    report, names, serve_error, class_error = (json.loads(x) for x in done.stdout.splitlines())
    assert report == {
        "implementation": "python",
        "stream": "TelemetryStream",
        "emit_is_native": False,
    }
    assert names == ["fallback.evt", "fallback.emit", "fallback.span.start", "fallback.span.stop"]
    assert "blocked by the test" in serve_error and "add_to_server" in serve_error
    assert "blocked by the test" in class_error
    warnings = [line for line in done.stderr.splitlines() if line.startswith("WARNING")]
    if value == "native":  # asked for it: one warning, naming the cause
        assert len(warnings) == 1 and "blocked by the test" in warnings[0], done.stderr
    else:
        assert warnings == [], done.stderr


def test_a_native_run_fails_at_once_without_the_extension() -> None:
    """script/test's native run cannot silently test the pure implementation."""
    target = str(PY_ROOT / "tests" / "test_proto.py")
    code = (
        BLOCKER
        + f"""
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", {target!r}]))
    """
    )
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SNAKEPIT_TELEMETRY_")}
    full_env.update({ENV: "native", "PYTHONPATH": str(PY_ROOT)})
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full_env,
        cwd=PY_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "the native implementation is not in use" in done.stdout + done.stderr
    assert " passed" not in done.stdout


def test_serve_refuses_a_pure_stream() -> None:
    telemetry.set_stream(telemetry.TelemetryStream(queue_size=8))
    with pytest.raises(RuntimeError, match="add_to_server"):
        telemetry.serve("127.0.0.1:0")
    with pytest.raises(RuntimeError, match="native"):
        telemetry.serve("127.0.0.1:0", telemetry.TelemetryStream(queue_size=8))  # type: ignore[arg-type]


# ------------------------------------------------------------------ native only


@pytest.fixture
def native_stream() -> telemetry.NativeTelemetryStream:
    s = telemetry.NativeTelemetryStream(queue_size=1024, secret=None)
    telemetry.set_stream(s)
    yield s
    s.stop_serving()
    s.close()


@pytest.mark.native_only
def test_serve_on_tcp_port_0(native_stream: telemetry.NativeTelemetryStream) -> None:
    backends._reset_for_tests()  # forget that set_stream chose the gRPC path
    assert telemetry.get_backend().name == "stderr"
    address = telemetry.serve("127.0.0.1:0")
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0 and native_stream.serving == address
    assert telemetry.get_backend().name == "grpc"  # serving chose the gRPC path
    for make in (BatchClient, Client):
        client = make(address)
        try:
            assert wait_until(lambda: native_stream.stats()["active_stream"])
            for i in range(50):
                telemetry.emit("served.evt", {"seq": i}, {"k": "v"}, "cid")
            events = client.take(50)
            assert [e.measurements["seq"].int_value for e in events] == list(range(50))
            assert {(e.correlation_id, e.metadata["k"]) for e in events} == {("cid", "v")}
            if isinstance(client, BatchClient):
                assert wait_until(lambda: client.stats_batches)  # noqa: B023
                report = client.stats_batches[0].events[0]
            else:
                _, report = client.take_stats()
            assert dict(report.metadata) == {
                "instance_id": native_stream.instance_id,
                "implementation": "native",
            }
        finally:
            client.close()
        assert wait_until(lambda: not native_stream.stats()["active_stream"])


@pytest.mark.native_only
def test_serve_on_a_unix_socket(
    native_stream: telemetry.NativeTelemetryStream,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "telemetry.sock"
    monkeypatch.setenv(telemetry.LISTEN_ENV, f"unix:{path}")
    address = telemetry.serve()  # the address from the environment
    assert address == f"unix:{path}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    client = BatchClient(address)
    try:
        with telemetry.span("unix.span", {"m": "x"}):
            pass
        start, stop = client.take(2)
        assert list(stop.event_parts) == ["unix", "span", "stop"]
        assert start.span_id == stop.span_id != 0 and dict(stop.metadata) == {"m": "x"}
    finally:
        client.close()


@pytest.mark.native_only
def test_served_calls_need_the_secret(tmp_path: Path) -> None:
    s = telemetry.NativeTelemetryStream(queue_size=64, secret="s3cret")
    try:
        address = s.serve(f"unix:{tmp_path / 'secret.sock'}")
        intruder = Client(address)
        try:
            assert intruder.done.wait(5)
            assert intruder.error is not None
            assert intruder.error.code() is grpc.StatusCode.UNAUTHENTICATED
        finally:
            intruder.close()
        assert s.stats()["refused_calls"] == 1
        owner = Client(address, secret="s3cret")
        try:
            s.emit_event("secret.evt", {"x": 1})
            (first,) = owner.take(1, timeout=10)
            assert list(first.event_parts) == ["secret", "evt"]
            assert first.measurements["x"].int_value == 1
        finally:
            owner.close()
    finally:
        s.stop_serving()
        s.close()


@pytest.mark.native_only
def test_bad_addresses_raise(native_stream: telemetry.NativeTelemetryStream) -> None:
    with pytest.raises((OSError, ValueError)):
        telemetry.serve("no-port-here")
    with pytest.raises((OSError, ValueError)):
        telemetry.serve("unix:/nonexistent-dir/for/sure/t.sock")


@pytest.mark.native_only
def test_emit_keeps_no_reference_to_the_callers_dicts(
    native_stream: telemetry.NativeTelemetryStream,
) -> None:
    class Tracked(dict):  # a dict that can be weakly referenced
        pass

    backends.set_backend("grpc")
    measurements, metadata = Tracked(x=1), Tracked(k="v")
    refs = sys.getrefcount(measurements), sys.getrefcount(metadata)
    gone = [weakref.ref(measurements), weakref.ref(metadata)]
    telemetry.emit("own.evt", measurements, metadata)
    native_stream.emit_event("own.direct", measurements, metadata)
    assert (sys.getrefcount(measurements), sys.getrefcount(metadata)) == refs
    # Changing them after the call changes nothing that is sent.
    measurements["x"] = 2
    metadata["k"] = "changed"
    measurements["new"] = 3
    del measurements, metadata
    assert [r() for r in gone] == [None, None]
    events = native_stream.drain_queued()
    assert [(e.parts, e.measurements, e.metadata) for e in events] == [
        (("own", "evt"), {"x": 1}, {"k": "v"}),
        (("own", "direct"), {"x": 1}, {"k": "v"}),
    ]


@contextlib.contextmanager
def in_forked_child(work: Callable[[], object]) -> Iterator[Any]:
    """Run ``work`` in a forked child and give what it returned (through JSON).

    The child stays alive (its threads and sockets with it) until the block
    ends; then it must have exited with 0. It leaves without running pytest's
    teardown.
    """
    read_end, write_end = os.pipe()
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.close(go_write)
            os.write(write_end, json.dumps(work()).encode())
            os.close(write_end)
            os.read(go_read, 1)  # the parent has read what it wanted
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    os.close(go_read)
    try:
        with os.fdopen(read_end, "rb") as pipe:
            yield json.loads(pipe.read())
    finally:
        os.write(go_write, b"x")
        os.close(go_write)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_forked_child_has_a_working_stream_of_its_own(tmp_path: Path) -> None:
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    s = telemetry.new_stream(queue_size=64)
    telemetry.set_stream(s)
    backends.set_backend("grpc")
    telemetry.emit("parent.evt", {"x": 1})
    parent_id = s.instance_id
    socket = tmp_path / "child.sock"

    def in_child() -> object:
        telemetry.emit("child.evt", {"x": 2})
        out: dict[str, object] = {"id": s.instance_id, "stats": s.stats()}
        if NATIVE:
            out["address"] = telemetry.serve(f"unix:{socket}")
        else:
            out["drained"] = [".".join(e.parts) for e in s.drain_queued()]
        return out

    with in_forked_child(in_child) as child:
        assert child["id"] != parent_id
        assert child["stats"]["emitted"] == 1 and child["stats"]["queue_len"] == 1
        if NATIVE:
            # The child serves its own events (not the parent's) from its own server.
            client = BatchClient(child["address"])
            try:
                (event,) = client.take(1, timeout=10)
                assert list(event.event_parts) == ["child", "evt"]
                assert wait_until(lambda: client.stats_batches, timeout=10)
                assert client.stats_batches[0].events[0].metadata["instance_id"] == child["id"]
                client.assert_quiet(0.1)
            finally:
                client.close()
        else:
            assert child["drained"] == ["child.evt"]
    # The parent's stream is unchanged.
    assert s.instance_id == parent_id
    assert [".".join(e.parts) for e in s.drain_queued()] == ["parent.evt"]


@pytest.mark.native_only
def test_a_child_forked_while_the_parent_serves(
    native_stream: telemetry.NativeTelemetryStream, tmp_path: Path
) -> None:
    """The child has no server and no call of its parent's; both serve their own."""
    parent = BatchClient(native_stream.serve(f"unix:{tmp_path / 'parent.sock'}"))
    try:
        assert wait_until(lambda: native_stream.stats()["active_stream"])
        native_stream.emit_event("parent.before", {"x": 1})
        assert [list(e.event_parts) for e in parent.take(1)] == [["parent", "before"]]

        def in_child() -> object:
            inherited = [native_stream.serving, native_stream.stats()["active_stream"]]
            address = native_stream.serve(f"unix:{tmp_path / 'child.sock'}")
            native_stream.emit_event("child.evt", {"x": 2})
            return [inherited, address]

        with in_forked_child(in_child) as (inherited, address):
            assert inherited == [None, False]
            child = BatchClient(address)
            try:
                (event,) = child.take(1, timeout=10)
                assert list(event.event_parts) == ["child", "evt"]
            finally:
                child.close()
        # The parent's call went on undisturbed.
        native_stream.emit_event("parent.after", {"x": 3})
        assert [list(e.event_parts) for e in parent.take(1)] == [["parent", "after"]]
        assert parent.error is None and native_stream.stats()["streams_opened"] == 1
    finally:
        parent.close()


@pytest.mark.native_only
def test_one_active_call_across_both_routes(
    native_stream: telemetry.NativeTelemetryStream,
) -> None:
    """A call on the extension's server takes over from a grpcio call, and back."""
    grpcio_address, stop_grpcio = start_serving(native_stream, "grpcio")
    rust_address = native_stream.serve("127.0.0.1:0")
    try:
        seq = 0
        previous: BatchClient | None = None
        for address in (grpcio_address, rust_address, grpcio_address):
            want = native_stream.stats()["streams_opened"] + 1
            client = BatchClient(address)
            assert wait_until(lambda w=want: native_stream.stats()["streams_opened"] == w)
            if previous is not None:
                assert previous.done.wait(5), "the superseded call did not end"
                assert previous.error is None  # ended normally, not cancelled
                previous.close()
            for _ in range(10):
                native_stream.emit_event("route.evt", {"seq": seq})
                seq += 1
            got = [e.measurements["seq"].int_value for e in client.take(10)]
            assert got == list(range(seq - 10, seq))
            previous = client
        assert previous is not None
        previous.close()
    finally:
        stop_grpcio()
