"""This package and Snakepit's own ``snakepit_bridge`` in one interpreter.

Snakepit v0.13 ships a regular top-level package ``snakepit_bridge`` (with its own
``telemetry`` subpackage) and top-level generated modules ``snakepit_bridge_pb2`` /
``snakepit_bridge_pb2_grpc`` built from a proto file also named
``snakepit_bridge.proto`` (proto package ``snakepit.bridge``) with other content.
The tests build a stand-in of that layout in a temporary directory (the proto
compiled with grpc_tools, as Snakepit's are) and run a fresh interpreter with
both directories on ``PYTHONPATH``, in both orders.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .conftest import PY_ROOT

# Same file name and proto package as ours, other messages; imports a well-known
# type as Snakepit's does. A second registration of this file name (or of one of
# these symbols) in protobuf's default pool fails the import with a TypeError.
FAKE_PROTO = """\
syntax = "proto3";
package snakepit.bridge;
import "google/protobuf/timestamp.proto";
message PingRequest { string message = 1; }
message PingResponse { string message = 1; google.protobuf.Timestamp server_time = 2; }
message TelemetryEvent { string event_name = 1; map<string, double> measurements = 2; }
message TelemetryControl { bool enabled = 1; }
service BridgeService {
  rpc Ping(PingRequest) returns (PingResponse);
  rpc StreamTelemetry(stream TelemetryControl) returns (stream TelemetryEvent);
}
"""

FAKE_FILES = {
    "snakepit_bridge/__init__.py": """\
        from .session_context import SessionContext
        ORIGIN = "fake-snakepit"
        """,
    "snakepit_bridge/session_context.py": """\
        class SessionContext:
            pass
        """,
    "snakepit_bridge/telemetry/__init__.py": """\
        ORIGIN = "fake-snakepit"
        EMITTED = []
        def emit(name, measurements=None, metadata=None, correlation_id=None):
            EMITTED.append(name)
        """,
    "snakepit_bridge/telemetry/stream.py": """\
        class TelemetryStream:
            ORIGIN = "fake-snakepit"
        """,
}

# Runs in the fresh interpreter; argv: the fake Snakepit's directory, priv/python,
# and the server kind (``aio``: ``grpc.aio.server`` with a thread pool, as Snakepit's).
CHILD = """\
import asyncio
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from google.protobuf import descriptor_pool

snakepit_dir = Path(sys.argv[1]).resolve()

# Snakepit's package is the one named snakepit_bridge, whatever the path order.
import snakepit_bridge
from snakepit_bridge import telemetry as their_telemetry
from snakepit_bridge.telemetry.stream import TelemetryStream as TheirStream

assert Path(snakepit_bridge.__file__).resolve() == snakepit_dir / "snakepit_bridge/__init__.py"
assert snakepit_bridge.ORIGIN == "fake-snakepit" and snakepit_bridge.SessionContext
assert their_telemetry.ORIGIN == "fake-snakepit" and TheirStream.ORIGIN == "fake-snakepit"
import snakepit_bridge_pb2 as their_pb
import snakepit_bridge_pb2_grpc as their_grpc

# Ours, by its own name, imported after Snakepit's generated modules...
from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import snakepit_bridge_pb2_grpc as pb_grpc
from snakepit_telemetry import telemetry

assert Path(telemetry.__file__).resolve().parent.parent.parent == Path(sys.argv[2]).resolve()
assert sys.modules["snakepit_bridge.telemetry"] is their_telemetry

# ...and each set of messages in its own pool: Snakepit's file in the default one.
default = descriptor_pool.Default().FindFileByName("snakepit_bridge.proto")
assert set(default.message_types_by_name) == {
    "PingRequest", "PingResponse", "TelemetryEvent", "TelemetryControl"
}, set(default.message_types_by_name)
assert pb.DESCRIPTOR.name == "snakepit_bridge.proto"
assert pb.DESCRIPTOR.pool is not descriptor_pool.Default()
assert "TelemetryEventBatch" in pb.DESCRIPTOR.message_types_by_name
assert their_pb.TelemetryEvent(event_name="x").event_name == "x"

# One gRPC server: Snakepit's servicer registered first, then our telemetry methods.
class SnakepitServicer(their_grpc.BridgeServiceServicer):
    def Ping(self, request, context):
        return their_pb.PingResponse(message="pong " + request.message)

    def StreamTelemetry(self, request_iterator, context):
        context.abort(grpc.StatusCode.FAILED_PRECONDITION, "served by Snakepit's servicer")

stream = telemetry.new_stream(queue_size=64)  # of the implementation under test
telemetry.set_stream(stream)

def build(server):
    their_grpc.add_BridgeServiceServicer_to_server(SnakepitServicer(), server)
    assert telemetry.add_to_server(server) is stream
    return server.add_insecure_port("127.0.0.1:0")

if sys.argv[3] == "aio":  # as Snakepit v0.13's grpc_server.py serves
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    async def start_aio():
        server = grpc.aio.server(futures.ThreadPoolExecutor(max_workers=4))
        port = build(server)
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start_aio(), loop).result(30)

    def stop():
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(30)
else:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    port = build(server)
    server.start()

    def stop():
        server.stop(0).wait(5)

channel = grpc.insecure_channel(f"127.0.0.1:{port}")

reply = their_grpc.BridgeServiceStub(channel).Ping(their_pb.PingRequest(message="hi"), timeout=30)
assert reply.message == "pong hi"

their_telemetry.emit("snakepit.own", {"n": 1})
telemetry.emit("beside.snakepit", {"n": 3, "ratio": 0.5}, {"k": "v"})
with telemetry.span("beside.work", {"tool": "t"}):
    pass

hold = threading.Event()

def controls():
    hold.wait(60)
    yield from ()

call = pb_grpc.BridgeServiceStub(channel).StreamTelemetry(controls(), timeout=60)
wanted = {"beside.snakepit", "beside.work.start", "beside.work.stop"}
got = {}
for event in call:
    name = ".".join(event.event_parts)
    if name in wanted:
        got[name] = event
    if set(got) == wanted:
        break
hold.set()
call.cancel()

event = got["beside.snakepit"]
assert event.measurements["n"].int_value == 3, event
assert event.measurements["ratio"].float_value == 0.5, event
assert dict(event.metadata) == {"k": "v"}, event
assert got["beside.work.stop"].span_id == got["beside.work.start"].span_id != 0
assert their_telemetry.EMITTED == ["snakepit.own"], their_telemetry.EMITTED
assert stream.stats()["queue_len"] == 0
channel.close()
stop()
print("BESIDE-OK")
"""


@pytest.fixture(scope="module")
def fake_snakepit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory laid out like Snakepit v0.13's priv/python (a stand-in, not its code)."""
    protoc = pytest.importorskip("grpc_tools.protoc")  # a dev dependency (gen_proto.py)
    root = tmp_path_factory.mktemp("snakepit") / "priv_python"
    root.mkdir()
    for rel, text in FAKE_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    proto_dir = root.parent / "proto"
    proto_dir.mkdir()
    (proto_dir / "snakepit_bridge.proto").write_text(FAKE_PROTO)
    include = Path(protoc.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{proto_dir}",
        f"-I{include}",
        f"--python_out={root}",
        f"--grpc_python_out={root}",
        str(proto_dir / "snakepit_bridge.proto"),
    ]
    assert protoc.main(args) == 0
    assert (root / "snakepit_bridge_pb2.py").is_file()
    return root


def _run(code: str, *path: Path, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in path))
    env.pop("SNAKEPIT_TELEMETRY_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        env=env,
        cwd=path[0].parent,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("server", ["aio", "sync"])
@pytest.mark.parametrize("order", ["snakepit_first", "ours_first"])
def test_both_packages_in_one_process(fake_snakepit: Path, order: str, server: str) -> None:
    """Both import; one server carries Snakepit's servicer and our telemetry methods."""
    path = (fake_snakepit, PY_ROOT) if order == "snakepit_first" else (PY_ROOT, fake_snakepit)
    run = _run(CHILD, *path, args=(str(fake_snakepit), str(PY_ROOT), server))
    assert run.returncode == 0 and "BESIDE-OK" in run.stdout, run.stdout + run.stderr


def test_fake_snakepit_really_clashes_with_default_pool_registration(fake_snakepit: Path) -> None:
    """The stand-in is a real test: our proto in the default pool would not import."""
    code = textwrap.dedent(
        """\
        import snakepit_bridge_pb2
        from google.protobuf import descriptor_pb2, descriptor_pool
        from snakepit_telemetry import snakepit_bridge_pb2 as ours
        proto = descriptor_pb2.FileDescriptorProto()
        ours.DESCRIPTOR.CopyToProto(proto)
        try:
            descriptor_pool.Default().AddSerializedFile(proto.SerializeToString())
        except TypeError as exc:
            print("CLASH", exc)
        """
    )
    run = _run(code, fake_snakepit, PY_ROOT)
    assert run.returncode == 0, run.stderr
    assert "CLASH" in run.stdout and "snakepit_bridge.proto" in run.stdout, run.stdout


def test_old_name_alone_is_this_package() -> None:
    """Without Snakepit's package, ``snakepit_bridge`` gives our modules, not copies."""
    code = textwrap.dedent(
        """\
        import snakepit_telemetry.telemetry as real
        import snakepit_telemetry.telemetry.stream as real_stream
        from snakepit_bridge import telemetry
        import snakepit_bridge.telemetry.stream as stream
        from snakepit_bridge.telemetry.backends import grpc as backend_grpc
        from snakepit_bridge import snakepit_bridge_pb2
        import snakepit_bridge
        import snakepit_telemetry
        assert telemetry is real and stream is real_stream
        assert stream.__spec__.name == "snakepit_telemetry.telemetry.stream"
        assert backend_grpc is sys.modules["snakepit_telemetry.telemetry.backends.grpc"]
        assert snakepit_bridge_pb2 is sys.modules["snakepit_telemetry.snakepit_bridge_pb2"]
        assert snakepit_bridge.__version__ == snakepit_telemetry.__version__
        assert telemetry.TelemetryStream is real_stream.TelemetryStream
        try:
            import snakepit_bridge.no_such_module
        except ModuleNotFoundError as exc:
            assert exc.name == "snakepit_telemetry.no_such_module", exc.name
        else:
            raise AssertionError("imported a module that does not exist")
        print("ALIAS-OK")
        """
    )
    run = _run("import sys\n" + code, PY_ROOT)
    assert run.returncode == 0 and "ALIAS-OK" in run.stdout, run.stdout + run.stderr
