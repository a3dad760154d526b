"""Public telemetry API for Snakepit Python workers.

``emit`` and ``span`` go through the current backend (:func:`set_backend`,
``SNAKEPIT_TELEMETRY_BACKEND``; see :mod:`.backends`). The ``grpc`` backend, the
default once :func:`add_to_server`, :func:`serve` or :func:`set_stream` was
called, queues them on a process-wide stream that Elixir pulls over the
``BridgeService/StreamTelemetryBatches`` call (or ``StreamTelemetry``, one event
per message); before that the default is ``stderr``.
Instrumentation must never break the instrumented code, so nothing here raises.

Two implementations of that stream (:func:`implementation` says which one runs;
``SNAKEPIT_TELEMETRY_IMPLEMENTATION`` = ``auto`` (default), ``native`` or
``python``, read once at import):

* ``native``: the Rust extension ``snakepit_telemetry._native``
  (:class:`NativeTelemetryStream`), chosen by ``auto`` when it is built.
  ``emit`` is the extension's function: it converts the event during the call
  and keeps no reference to the caller's measurements and metadata (changing
  them afterwards changes nothing that is sent; the other backends converted
  during the call already, so this now holds on every path, except for a pure
  :class:`TelemetryStream` passed to :func:`set_stream` explicitly). Queueing,
  encoding and sending run in Rust, outside the GIL. :func:`serve` serves the
  calls from a gRPC server on Rust threads in this process;
  :func:`add_to_server` still works.
* ``python``: :class:`TelemetryStream`, chosen where the extension is not built
  (``native`` falls back to it with one warning). Served with
  :func:`add_to_server` only. Its grpc path queues the caller's measurements
  and metadata as they are and reads them later, on the stream thread: do not
  change them after the call.

Both have the same wire contract, counters, stats events (their metadata
``implementation`` names the one that sent them), control semantics and secret
check. :func:`new_stream` makes a stream of the implementation in use.

Also here: correlation IDs (:mod:`.correlation`, picked up by ``emit``/``span``),
:class:`TelemetryInterceptor` for the worker's gRPC server, resource samplers,
a GC hook, and :func:`report_error` / :func:`tool` for tool failures.

Security: the stream refuses telemetry calls without the worker's secret
(``SNAKEPIT_TELEMETRY_SECRET``, see :mod:`._internal.auth`), and
:func:`add_port` binds a ``unix:`` address as a 0600 socket in a 0700
directory.
"""

from __future__ import annotations

import os
from typing import Any

import grpc

from .. import snakepit_bridge_pb2 as pb
from . import correlation
from ._internal import implementation as _implementation
from ._internal.aio_context import aio_handler, is_aio_server
from ._internal.auth import SECRET_ENV, SECRET_HEADER
from ._internal.core import (
    ERROR_EVENT,
    ERROR_MESSAGE_LIMIT,
    emit,
    get_stream,
    report_error,
    set_stream,
    span,
    stats,
    tool,
)
from ._internal.defaults import current as _current_stream
from ._internal.defaults import new_stream
from ._internal.implementation import IMPLEMENTATION_ENV
from ._internal.transport import add_port
from .backends import Backend, backend_stats, get_backend, mark_served, set_backend
from .correlation import CORRELATION_HEADER
from .gc_events import GC_EVENT, install_gc_hook, uninstall_gc_hook
from .interceptor import TelemetryInterceptor
from .native_stream import AnyTelemetryStream, NativeTelemetryStream
from .samplers import CPU_EVENT, MEMORY_EVENT, start_samplers, stop_samplers
from .stream import TelemetryStream

__all__ = [
    "AnyTelemetryStream",
    "Backend",
    "CORRELATION_HEADER",
    "CPU_EVENT",
    "DEFAULT_LISTEN",
    "ERROR_EVENT",
    "ERROR_MESSAGE_LIMIT",
    "GC_EVENT",
    "IMPLEMENTATION_ENV",
    "LISTEN_ENV",
    "MEMORY_EVENT",
    "NativeTelemetryStream",
    "SECRET_ENV",
    "SECRET_HEADER",
    "SERVER_OPTIONS",
    "SERVICE_NAME",
    "TelemetryInterceptor",
    "TelemetryStream",
    "add_port",
    "add_to_server",
    "backend_stats",
    "correlation",
    "emit",
    "get_backend",
    "get_stream",
    "implementation",
    "install_gc_hook",
    "new_stream",
    "report_error",
    "serve",
    "set_backend",
    "set_stream",
    "span",
    "start_samplers",
    "stats",
    "stop_samplers",
    "tool",
    "uninstall_gc_hook",
]

SERVICE_NAME = "snakepit.bridge.BridgeService"
# Where :func:`serve` listens when given no address.
LISTEN_ENV = "SNAKEPIT_TELEMETRY_LISTEN"
DEFAULT_LISTEN = "127.0.0.1:0"

# Options for ``grpc.server(..., options=SERVER_OPTIONS)`` that let the NIF's
# HTTP/2 keepalive PINGs through on a quiet telemetry stream. By default
# grpc-core takes a PING that comes sooner than 5 minutes after the previous
# one, with no data sent in between, as a strike, and after two strikes ends
# the connection (GOAWAY "too many pings"). With these options Elixir's
# ``keepalive_interval_ms`` can be lowered to seconds, so a hung worker is
# noticed that soon (see the README's Lifecycle).
SERVER_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
    ("grpc.http2.max_ping_strikes", 0),
)


def _parse_control(data: bytes) -> pb.TelemetryControl:
    """Lenient deserializer so a malformed control cannot fail the whole call.

    gRPC aborts the call if a deserializer raises or returns ``None``, so garbage
    becomes an empty control, which the stream counts and ignores.
    """
    try:
        return pb.TelemetryControl.FromString(data)
    except Exception:
        return pb.TelemetryControl()


def _already_encoded(payload: bytes) -> bytes:
    """Response serializer of StreamTelemetryBatches: the stream yields wire bytes."""
    return payload


def implementation() -> str:
    """``"native"`` or ``"python"``: the implementation of the default stream.

    Before a default stream exists, the one it will be (see
    ``SNAKEPIT_TELEMETRY_IMPLEMENTATION`` in the module docstring); after
    :func:`set_stream`, that stream's.
    """
    stream = _current_stream()
    if stream is None:
        return _implementation.name()
    return _implementation.NATIVE if isinstance(stream, NativeTelemetryStream) else "python"


def serve(address: str | None = None, stream: NativeTelemetryStream | None = None) -> str:
    """Serve the telemetry calls from a gRPC server on Rust threads; return its address.

    Native implementation only. ``address`` is ``host:port`` (port 0 picks a
    free one) or ``unix:/path`` (a 0600 socket); without one,
    ``SNAKEPIT_TELEMETRY_LISTEN``, else ``127.0.0.1:0``. Returns the bound
    address (``"127.0.0.1:45123"``, ``"unix:/path"``): the worker announces it
    to Elixir as its telemetry address. Serves ``stream`` (default: the default
    stream), with the same secret check as :func:`add_to_server`; from now on
    the default backend is ``grpc`` (unless one was chosen).

    Raises ``RuntimeError`` with the python implementation (serve with
    :func:`add_to_server` on a grpcio server there), and ``OSError`` or
    ``ValueError`` when the address cannot be bound.
    """
    target = stream if stream is not None else get_stream()
    if not isinstance(target, NativeTelemetryStream):
        why = _implementation.reason() or "the default stream is a pure-Python TelemetryStream"
        raise RuntimeError(
            "telemetry.serve() needs the native telemetry implementation, and this process "
            f"runs the python one ({why}); serve the telemetry calls with "
            "telemetry.add_to_server(grpc_server) instead"
        )
    if address is None:
        address = os.environ.get(LISTEN_ENV, "").strip() or DEFAULT_LISTEN
    bound = target.serve(address)
    mark_served()
    return bound


def add_to_server(
    server: grpc.Server | grpc.aio.Server,
    stream: AnyTelemetryStream | None = None,
    *,
    batches: bool = True,
) -> AnyTelemetryStream:
    """Register the telemetry methods of ``BridgeService`` on an existing server.

    ``StreamTelemetryBatches`` (unless ``batches=False``) and ``StreamTelemetry``:
    Elixir asks for batches first and falls back to the plain stream when the
    worker answers UNIMPLEMENTED. Claims only these methods, so Snakepit's other
    BridgeService methods can be registered on the same server side by side.
    ``server`` is a ``grpc.server`` or a ``grpc.aio.server`` (Snakepit's worker
    runs one): there each call is served from a daemon thread of its own behind
    an ``async`` handler (see ``_internal/aio_context.py``). They are
    registered both as a generic handler and, through
    ``add_registered_method_handlers``, as registered methods: gRPC prefers a
    registered method over a generic handler and a later registration over an
    earlier one, so calling this after Snakepit's
    ``add_BridgeServiceServicer_to_server`` and before ``server.start()`` makes
    these two methods ours while Snakepit's servicer keeps the rest. Returns the
    stream that serves the calls (the default one unless given). From now on the
    default backend is ``grpc`` (unless one was chosen).
    """
    target = stream if stream is not None else get_stream()
    plain: Any = target.StreamTelemetry
    batched: Any = target.StreamTelemetryBatches
    if is_aio_server(server):
        plain, batched = aio_handler(plain), aio_handler(batched)
    # The native stream takes the controls as bytes and yields encoded messages
    # on both methods (None: gRPC passes bytes through unchanged).
    native = isinstance(target, NativeTelemetryStream)
    request_deserializer: Any = None if native else _parse_control
    plain_serializer: Any = None if native else pb.TelemetryEvent.SerializeToString
    methods = {
        "StreamTelemetry": grpc.stream_stream_rpc_method_handler(
            plain,
            request_deserializer=request_deserializer,
            response_serializer=plain_serializer,
        )
    }
    if batches:
        methods["StreamTelemetryBatches"] = grpc.stream_stream_rpc_method_handler(
            batched,
            request_deserializer=request_deserializer,
            response_serializer=None if native else _already_encoded,
        )
    handler = grpc.method_handlers_generic_handler(SERVICE_NAME, methods)
    server.add_generic_rpc_handlers((handler,))
    register = getattr(server, "add_registered_method_handlers", None)
    if register is not None:
        register(SERVICE_NAME, methods)
    mark_served()
    return target
