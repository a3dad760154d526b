"""Only the holder of the worker's secret may open its telemetry call."""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import snakepit_bridge_pb2_grpc as pb_grpc
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal import auth

from .conftest import BATCHES_METHOD, BatchClient, Client, start_serving, wait_until

SECRET = "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3I"
WRONG = "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmc"


class OwnerClient(Client):
    """A StreamTelemetry call that carries the secret."""

    def _open(self, requests: Iterator[pb.TelemetryControl]) -> Any:
        stub = pb_grpc.BridgeServiceStub(self.channel)
        return stub.StreamTelemetry(requests, metadata=((telemetry.SECRET_HEADER, SECRET),))


class OwnerBatchClient(BatchClient):
    def _open(self, requests: Iterator[pb.TelemetryControl]) -> Any:
        method = self.channel.stream_stream(
            BATCHES_METHOD,
            request_serializer=pb.TelemetryControl.SerializeToString,
            response_deserializer=pb.TelemetryEventBatch.FromString,
        )
        return method(requests, metadata=((telemetry.SECRET_HEADER, SECRET),))


def intrude(address: str, secret: str | None, batches: bool) -> grpc.StatusCode:
    """Open a telemetry call, send toggle(false), return the status it ends with."""
    metadata = () if secret is None else ((telemetry.SECRET_HEADER, secret),)
    off = pb.TelemetryControl(toggle=pb.TelemetryToggle(enabled=False))
    with grpc.insecure_channel(address) as channel:
        if batches:
            call = channel.stream_stream(
                BATCHES_METHOD,
                request_serializer=pb.TelemetryControl.SerializeToString,
                response_deserializer=pb.TelemetryEventBatch.FromString,
            )(iter([off]), metadata=metadata, timeout=5)
        else:
            call = pb_grpc.BridgeServiceStub(channel).StreamTelemetry(
                iter([off]), metadata=metadata, timeout=5
            )
        try:
            for _ in call:
                pass
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


@pytest.fixture
def secured(route: str) -> Iterator[tuple[telemetry.AnyTelemetryStream, str]]:
    s = telemetry.new_stream(queue_size=1024, secret=SECRET)
    address, stop = start_serving(s, route)
    yield s, address
    s.close()
    stop()


@pytest.mark.parametrize("owner_cls", [OwnerClient, OwnerBatchClient])
def test_intruders_are_refused_and_the_owner_keeps_streaming(
    secured: tuple[telemetry.AnyTelemetryStream, str], owner_cls: Callable[[str], Client]
) -> None:
    s, address = secured
    owner = owner_cls(address)
    try:
        s.emit_event("python.call.start", {"count": 1})
        assert len(owner.take(1)) == 1
        for secret in (None, WRONG, ""):
            for batches in (True, False):
                assert intrude(address, secret, batches) == grpc.StatusCode.UNAUTHENTICATED
        stats = s.stats()
        assert stats["refused_calls"] == 6
        # The owner's call was never replaced nor steered: still the only one
        # opened, still enabled, and it keeps receiving.
        assert stats["streams_opened"] == 1 and stats["active_stream"] and stats["enabled"]
        for _ in range(50):
            s.emit_event("python.call.stop", {"count": 1})
        assert len(owner.take(50)) == 50
        assert owner.error is None and not owner.done.is_set()
        # The refusals reach the owner in the stats reports.
        assert wait_until(lambda: _reported_refusals(owner) == 6)
    finally:
        owner.close()


def _reported_refusals(client: Client) -> int:
    latest = -1
    if isinstance(client, BatchClient):
        for batch in client.stats_batches:
            for event in batch.events:
                latest = event.measurements["refused_calls"].int_value
        return latest
    while not client.stats.empty():
        latest = client.stats.get_nowait()[1].measurements["refused_calls"].int_value
    client._last_refused = max(latest, getattr(client, "_last_refused", -1))  # type: ignore[attr-defined]
    return client._last_refused  # type: ignore[attr-defined]


def test_the_right_secret_may_take_over_as_before(
    secured: tuple[telemetry.AnyTelemetryStream, str],
) -> None:
    s, address = secured
    first = OwnerClient(address)
    # One call after the other: the later call is the one that takes over.
    assert wait_until(lambda: s.stats()["streams_opened"] == 1)
    second = OwnerClient(address)
    try:
        assert wait_until(lambda: s.stats()["streams_opened"] == 2)
        s.emit_event("python.call.start", {"count": 1})
        assert len(second.take(1)) == 1
        assert s.stats()["refused_calls"] == 0
    finally:
        first.close()
        second.close()


def test_without_a_secret_every_call_is_served_with_one_warning(
    serve: Callable[[telemetry.AnyTelemetryStream], str], caplog: pytest.LogCaptureFixture
) -> None:
    auth._reset_for_tests()
    s = telemetry.new_stream(secret=None)
    address = serve(s)
    caplog.set_level(logging.WARNING, logger=auth.__name__)
    clients = [Client(address)]
    # One call after the other: the later call is the one that takes over.
    assert wait_until(lambda: s.stats()["streams_opened"] == 1)
    clients.append(Client(address))
    try:
        assert wait_until(lambda: s.stats()["streams_opened"] == 2)
        s.emit_event("python.call.start", {"count": 1})
        assert len(clients[1].take(1)) == 1
        warnings = [r for r in caplog.records if "without a secret" in r.getMessage()]
        assert len(warnings) == 1
        assert s.stats()["refused_calls"] == 0
    finally:
        for c in clients:
            c.close()


def test_the_secret_is_read_once_from_the_environment_and_removed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auth._reset_for_tests(environ_secret=SECRET)
    try:
        s = telemetry.new_stream()
        assert auth.SECRET_ENV not in os.environ
        assert s._auth.required
        # Later streams of the process use the same secret.
        assert telemetry.new_stream()._auth.required
        text = repr(s._auth) + repr(vars(s).get("_auth")) + repr(vars(s).get("_native"))
        assert SECRET not in text
    finally:
        monkeypatch.delenv(auth.SECRET_ENV, raising=False)
        auth._reset_for_tests()


def test_a_call_that_fails_to_show_metadata_is_refused() -> None:
    class Broken:
        def invocation_metadata(self) -> object:
            raise RuntimeError("boom")

    assert not auth.CallAuth(SECRET).admits(Broken())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        auth.CallAuth(42)


def test_add_port_makes_a_private_unix_socket() -> None:
    base = tempfile.mkdtemp()
    path = os.path.join(base, "private", "w.sock")
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        assert telemetry.add_port(srv, f"unix:{path}") == f"unix:{path}"
        srv.start()
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.stop(0).wait(2)
    # A stale socket left behind is replaced.
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        import socket

        stale = socket.socket(socket.AF_UNIX)
        stale.bind(path)
        stale.close()
        assert telemetry.add_port(srv, f"unix:{path}") == f"unix:{path}"
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        srv.stop(0).wait(2)


def test_add_port_tcp_and_bad_addresses(caplog: pytest.LogCaptureFixture) -> None:
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    try:
        address = telemetry.add_port(srv, "localhost:0")
        assert address.startswith("127.0.0.1:") and int(address.rsplit(":", 1)[1]) > 0
        for bad in ("unix:relative.sock", "no-port", "host:abc"):
            with pytest.raises(ValueError):
                telemetry.add_port(srv, bad)
        caplog.set_level(logging.WARNING)
        shared = tempfile.mkdtemp()
        os.chmod(shared, 0o755)
        telemetry.add_port(srv, f"unix:{shared}/w.sock")
        assert any("open to other users" in r.getMessage() for r in caplog.records)
    finally:
        srv.stop(0).wait(2)
