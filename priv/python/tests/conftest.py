"""Shared fixtures: a fresh default stream, a real loopback gRPC server, a client.

The suite runs against the implementation that ``SNAKEPIT_TELEMETRY_IMPLEMENTATION``
selects (``script/test`` runs it twice: ``python``, then ``native``). Tests make
their streams with ``telemetry.new_stream`` (the selected implementation's
class); tests of pure-Python internals carry ``@pytest.mark.python_only(reason)``
and are skipped on the native run, tests of what only the native implementation
has carry ``@pytest.mark.native_only`` and are skipped on the python run. With
``SNAKEPIT_TELEMETRY_IMPLEMENTATION=native`` the session fails at once unless the
extension is really in use.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

PY_ROOT = Path(__file__).resolve().parent.parent
if str(PY_ROOT) not in sys.path:
    sys.path.insert(0, str(PY_ROOT))

from snakepit_telemetry import snakepit_bridge_pb2 as pb  # noqa: E402
from snakepit_telemetry import snakepit_bridge_pb2_grpc as pb_grpc  # noqa: E402
from snakepit_telemetry import telemetry  # noqa: E402
from snakepit_telemetry.telemetry import backends  # noqa: E402
from snakepit_telemetry.telemetry._internal import auth, core, implementation  # noqa: E402
from snakepit_telemetry.telemetry._internal.convert import QueuedEvent  # noqa: E402

# The implementation this run tests.
NATIVE = implementation.name() == implementation.NATIVE


# What a span that took the fast path to the default stream has as its backend.
FAST_SPAN = core._NATIVE_SPAN if NATIVE else core._FAST_SPAN


def fast_path(s: telemetry.AnyTelemetryStream) -> bool:
    """Whether ``telemetry.emit`` and spans go straight to ``s`` (no backend object):
    the extension's default stream (native), or the core's inlined path (python)."""
    if NATIVE:
        return core._native_stream is s._native and telemetry.emit is implementation.native().emit  # type: ignore[union-attr]
    return core._fast_stream is s


def idle(s: telemetry.AnyTelemetryStream) -> bool:
    """Whether the stream's sender waits for an event (so an emit must wake it)."""
    if NATIVE:
        return bool(s._native.idle)
    return s._idle > 0


def pytest_sessionstart(session: pytest.Session) -> None:
    wanted = os.environ.get(implementation.IMPLEMENTATION_ENV, "").strip().lower()
    if wanted == "native" and not (NATIVE and telemetry.emit is implementation.native().emit):  # type: ignore[union-attr]
        pytest.exit(
            f"{implementation.IMPLEMENTATION_ENV}=native but the native implementation is not "
            f"in use ({implementation.reason()}); build it with script/build-python-ext",
            returncode=3,
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        python_only = item.get_closest_marker("python_only")
        if NATIVE and python_only is not None:
            why = python_only.args[0] if python_only.args else python_only.kwargs.get("reason")
            item.add_marker(pytest.mark.skip(reason=f"python implementation internals: {why}"))
        if not NATIVE and item.get_closest_marker("native_only") is not None:
            item.add_marker(pytest.mark.skip(reason="needs the native implementation"))


_CLOSE = object()
STATS_PARTS = ["telemetry", "python", "stats"]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``predicate``; controls and sends are applied on other threads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def drain(stream: telemetry.AnyTelemetryStream) -> list[QueuedEvent]:
    """Take the queued events without a gRPC call (tests only)."""
    return stream.drain_queued()


def names(events: list[QueuedEvent]) -> list[str]:
    return [".".join(e.parts) for e in events]


class Client:
    """A StreamTelemetry call made with the generated stub, read on a thread.

    Stats reports go to ``stats`` so tests about regular events need not skip them.
    Subclasses open another method (``_open``) and read its messages (``_consume``).
    With ``secret``, the call carries it (``SECRET_HEADER``).
    """

    def __init__(self, address: str, secret: str | None = None, **channel_options: object) -> None:
        self._metadata = () if secret is None else ((auth.SECRET_HEADER, secret),)
        if address.startswith("unix:"):
            # grpc-core sends the percent-encoded socket path as :authority, which
            # the native server's HTTP/2 stack (h2) rejects as malformed.
            channel_options.setdefault("grpc.default_authority", "localhost")
        self.channel = grpc.insecure_channel(address, options=list(channel_options.items()))
        self._requests: queue.Queue[object] = queue.Queue()
        self.events: queue.Queue[pb.TelemetryEvent] = queue.Queue()
        self.stats: queue.Queue[tuple[float, pb.TelemetryEvent]] = queue.Queue()
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self.call = self._open(self._request_iter())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _open(self, requests: Iterator[pb.TelemetryControl]) -> Any:
        stub = pb_grpc.BridgeServiceStub(self.channel)
        return stub.StreamTelemetry(requests, metadata=self._metadata)

    def _consume(self, event: pb.TelemetryEvent) -> None:
        if list(event.event_parts) == STATS_PARTS:
            self.stats.put((time.monotonic(), event))
        else:
            self.events.put(event)

    def _request_iter(self) -> Iterator[pb.TelemetryControl]:
        while True:
            item = self._requests.get()
            if item is _CLOSE:
                return
            assert isinstance(item, pb.TelemetryControl)
            yield item

    def _read(self) -> None:
        try:
            for message in self.call:
                self._consume(message)
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.done.set()

    def send(self, control: pb.TelemetryControl) -> None:
        self._requests.put(control)

    def take(self, n: int, timeout: float = 5.0) -> list[pb.TelemetryEvent]:
        """Exactly ``n`` events (fails the test if they do not arrive in time)."""
        deadline = time.monotonic() + timeout
        out = []
        for _ in range(n):
            remaining = max(0.0, deadline - time.monotonic())
            try:
                out.append(self.events.get(timeout=remaining))
            except queue.Empty:
                pytest.fail(f"expected {n} events, got {len(out)}")
        return out

    def take_all(self) -> list[pb.TelemetryEvent]:
        """Whatever arrived so far."""
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def take_stats(self, timeout: float = 5.0) -> tuple[float, pb.TelemetryEvent]:
        """The next stats report with its arrival time (monotonic)."""
        try:
            return self.stats.get(timeout=timeout)
        except queue.Empty:
            pytest.fail("no stats report in time")

    def assert_quiet(self, wait: float = 0.2) -> None:
        time.sleep(wait)
        assert self.events.empty(), "unexpected extra event"

    def close(self) -> None:
        self._requests.put(_CLOSE)
        self.call.cancel()
        self.done.wait(2)
        self.channel.close()


BATCHES_METHOD = "/snakepit.bridge.BridgeService/StreamTelemetryBatches"


class BatchClient(Client):
    """A StreamTelemetryBatches call (generic stub), read on a thread.

    Keeps every batch message as received; ``events`` holds the regular events
    with absolute timestamps (base + offset), stats reports go to ``stats_batches``.
    """

    def __init__(self, address: str, secret: str | None = None, **channel_options: object) -> None:
        self.batches: list[pb.TelemetryEventBatch] = []  # regular events only
        self.stats_batches: list[pb.TelemetryEventBatch] = []
        super().__init__(address, secret, **channel_options)

    def _open(self, requests: Iterator[pb.TelemetryControl]) -> Any:
        method = self.channel.stream_stream(
            BATCHES_METHOD,
            request_serializer=pb.TelemetryControl.SerializeToString,
            response_deserializer=pb.TelemetryEventBatch.FromString,
        )
        return method(requests, metadata=self._metadata)

    def _consume(self, batch: pb.TelemetryEventBatch) -> None:  # type: ignore[override]
        if any(list(e.event_parts) == STATS_PARTS for e in batch.events):
            self.stats_batches.append(batch)  # tests check it holds nothing else
            return
        self.batches.append(batch)
        for event in batch.events:
            event.timestamp_ns += batch.base_timestamp_ns
            self.events.put(event)


@pytest.fixture(autouse=True)
def _fresh_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No backend choice (nor a served stream) leaks between tests or from the shell."""
    monkeypatch.delenv(backends.BACKEND_ENV, raising=False)
    backends._reset_for_tests()
    yield
    backends._reset_for_tests()


@pytest.fixture
def stream() -> Iterator[telemetry.AnyTelemetryStream]:
    """A fresh default stream per test (of the implementation under test), so
    counters start at zero."""
    s = telemetry.new_stream(queue_size=1024)
    telemetry.set_stream(s)
    yield s
    s.close()


# How the ``server`` and ``serve`` fixtures serve a stream: through grpcio
# (``telemetry.add_to_server``) and, on the native run, also from the extension's
# own server (``NativeTelemetryStream.serve``): each test using them runs once per route.
ROUTES = ["grpcio", "rust"] if NATIVE else ["grpcio"]


@pytest.fixture(params=ROUTES)
def route(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def start_serving(s: telemetry.AnyTelemetryStream, route: str) -> tuple[str, Callable[[], None]]:
    """Serve ``s`` on a loopback port by ``route``; returns its address and how to stop."""
    if route == "rust":
        assert isinstance(s, telemetry.NativeTelemetryStream)
        return s.serve("127.0.0.1:0"), s.stop_serving
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    telemetry.add_to_server(srv, s)
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    return f"127.0.0.1:{port}", lambda: srv.stop(0).wait(2)


@pytest.fixture
def server(stream: telemetry.AnyTelemetryStream, route: str) -> Iterator[str]:
    """A real gRPC server on loopback serving ``stream``; yields its address."""
    address, stop = start_serving(stream, route)
    yield address
    stream.close()
    stop()


@pytest.fixture
def serve(route: str) -> Iterator[Callable[[telemetry.AnyTelemetryStream], str]]:
    """Serve any stream (e.g. one built under a patched environment); yields a factory."""
    servers: list[tuple[telemetry.AnyTelemetryStream, Callable[[], None]]] = []

    def start(s: telemetry.AnyTelemetryStream) -> str:
        address, stop = start_serving(s, route)
        servers.append((s, stop))
        return address

    yield start
    for s, stop in servers:
        s.close()
        stop()


@pytest.fixture
def connect(server: str) -> Iterator[Callable[[], Client]]:
    """Factory for clients; all are closed at teardown."""
    clients: list[Client] = []

    def make() -> Client:
        client = Client(server)
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
