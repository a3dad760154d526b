"""NativeTelemetryStream: :class:`~.stream.TelemetryStream`'s API over the Rust extension.

The native implementation (``snakepit_telemetry._native``, see
:mod:`._internal.implementation`) does everything after ``emit`` outside the
GIL: ``emit_event`` reads the caller's arguments and converts them at once, by
the same rules as the pure path (:mod:`._internal.convert`,
:mod:`._internal.wire`), so it keeps no reference to the caller's measurements
and metadata (changing them after the call changes nothing that is sent); the
control decision, protobuf encoding, the bounded queue, batching and stats
events run in Rust, and so does the server of :meth:`serve` (a gRPC server on
Rust threads inside this process; ``telemetry.serve``).

The same environment as the pure stream, read once when a stream is created
(``SNAKEPIT_TELEMETRY_QUEUE_SIZE``, ``_ENABLED``, ``_SAMPLING_RATE``,
``_ALLOW``, ``_DENY``, ``_FLUSH_INTERVAL_MS``, ``_STATS_INTERVAL_MS``,
``_MAX_MESSAGE_BYTES``; parsed here, in Python, with the same fallbacks), the
same counters, wire contract, stats events (their metadata says
``implementation: native``), control semantics and secret check. The grpcio
route (``telemetry.add_to_server``) still works: its handlers pull messages that
Rust encoded (:meth:`StreamTelemetry`, :meth:`StreamTelemetryBatches`), one
active call per stream on either route, a new call taking over.

A forked child starts over as a new instance, as with the pure stream.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from .. import snakepit_bridge_pb2 as pb
from ._internal import auth, env, errors, implementation
from ._internal.control import ControlState
from ._internal.convert import QueuedEvent
from .stream import (
    DEFAULT_FLUSH_INTERVAL_MS,
    DEFAULT_MAX_MESSAGE_BYTES,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_STATS_INTERVAL_MS,
    FLUSH_INTERVAL_ENV,
    MAX_MESSAGE_BYTES_ENV,
    QUEUE_SIZE_ENV,
    STATS_INTERVAL_ENV,
    TAKEOVER_GRACE_S,
    GrpcRoute,
    TelemetryStream,
)
from .stream import _streams as _fork_registry

__all__ = ["AnyTelemetryStream", "NativeTelemetryStream", "queued_event"]

log = logging.getLogger(__name__)

# How long a grpcio handler waits for the next message before it checks
# whether its call is still active (a takeover or close ends the wait at once).
_WAIT_SLICE_S = 0.25


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def queued_event(data: bytes) -> QueuedEvent:
    """A serialized ``TelemetryEvent`` as the pure stream's :class:`QueuedEvent`."""
    msg = pb.TelemetryEvent.FromString(data)
    values: dict[str, int | float | str] = {}
    for key, value in msg.measurements.items():
        which = value.WhichOneof("value")
        if which == "int_value":
            values[key] = value.int_value
        elif which == "float_value":
            values[key] = value.float_value
        else:
            values[key] = value.string_value
    return QueuedEvent(
        tuple(msg.event_parts),
        values,
        dict(msg.metadata),
        msg.timestamp_ns,
        msg.correlation_id,
        msg.span_id,
        tuple((f.file, f.line, f.function) for f in msg.stacktrace),
    )


class NativeTelemetryStream(GrpcRoute):
    """The native implementation's stream (see the module docstring).

    Constructed like :class:`TelemetryStream`; raises ``RuntimeError`` when the
    native implementation is not in use (extension not built, or
    ``SNAKEPIT_TELEMETRY_IMPLEMENTATION=python``).
    """

    def __init__(self, queue_size: int | None = None, *, secret: Any = auth.FROM_ENV) -> None:
        native = implementation.native()
        if native is None:
            raise RuntimeError(
                "NativeTelemetryStream needs the native telemetry implementation; this "
                f"process runs the python one ({implementation.reason()})"
            )
        if queue_size is None:
            size = env.positive_int(QUEUE_SIZE_ENV, DEFAULT_QUEUE_SIZE)
        else:
            size = int(queue_size)
        if size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        control = ControlState.from_env(os.environ)
        self._auth = auth.CallAuth(secret)
        # The settings as parsed (the extension gets them in milliseconds).
        self._stats_interval = env.seconds_from_ms(STATS_INTERVAL_ENV, DEFAULT_STATS_INTERVAL_MS)
        self._flush_interval = env.seconds_from_ms(FLUSH_INTERVAL_ENV, DEFAULT_FLUSH_INTERVAL_MS)
        self._max_message_bytes = env.positive_int(MAX_MESSAGE_BYTES_ENV, DEFAULT_MAX_MESSAGE_BYTES)
        self._native = native.Stream(
            queue_size=size,
            flush_interval_ms=_ms(self._flush_interval),
            stats_interval_ms=_ms(self._stats_interval),
            max_message_bytes=self._max_message_bytes,
            enabled=control.enabled,
            default_rate=control.default_rate,
            allow=list(control.allow),
            deny=list(control.deny),
            secret=self._auth.secret(),
        )
        # The hot methods are the extension's own bound methods: no Python frame
        # between the caller and Rust.
        self.emit_event = self._native.emit_event  # type: ignore[method-assign]
        self.sample = self._native.sample  # type: ignore[method-assign]
        self.sample_rate = self._native.sample_rate  # type: ignore[method-assign]
        self._lock = threading.Lock()
        # grpcio calls whose handler has not returned yet, by generation.
        self._running: dict[int, grpc.ServicerContext] = {}
        _fork_registry.add(self)  # renewed in a forked child, as pure streams are

    def _start_over_after_fork(self) -> None:
        """In a forked child: a new instance (new id, counters at 0, empty queue,
        no call, no server); the extension rebuilds its threads when needed."""
        self._lock = threading.Lock()
        self._running = {}
        try:
            self._native.after_fork_in_child()
        except Exception:
            errors.count()

    # ------------------------------------------------------------------ emit path
    # Replaced per instance by the extension's bound methods (see __init__); these
    # definitions document them.

    def emit_event(
        self,
        event: str | Sequence[str],
        measurements: Any = None,
        metadata: Any = None,
        correlation_id: str | None = None,
        sampled: bool | None = None,
        span_id: int = 0,
        stacktrace: tuple[tuple[str, int, str], ...] = (),
    ) -> None:
        """As :meth:`TelemetryStream.emit_event`, but the arguments are converted
        now: the caller's mappings are not referenced after the call."""
        self._native.emit_event(
            event, measurements, metadata, correlation_id, sampled, span_id, stacktrace
        )

    def sample(self, event: str | Sequence[str]) -> bool:
        """As :meth:`TelemetryStream.sample`."""
        return bool(self._native.sample(event))

    def sample_rate(self, event: str) -> float:
        """As :meth:`TelemetryStream.sample_rate`."""
        return float(self._native.sample_rate(event))

    def wake(self) -> None:
        """Nothing to do: the extension wakes its sender itself (kept for API parity)."""

    def count(self, counter: str, amount: int = 1) -> None:
        """Add ``amount`` to one of the stream's counters (e.g. ``refused_calls``)."""
        self._native.count(counter, amount)

    _bump = count

    # ---------------------------------------------------------------- inspection

    @property
    def implementation(self) -> str:
        """``"native"``."""
        return implementation.NATIVE

    @property
    def queue_size(self) -> int:
        """The queue bound."""
        return int(self._native.queue_size)

    @property
    def instance_id(self) -> str:
        """This stream instance's id, sent with its stats events."""
        return str(self._native.instance_id)

    def stats(self) -> dict[str, int | bool]:
        """The same keys as :meth:`TelemetryStream.stats`."""
        out: dict[str, int | bool] = dict(self._native.stats())
        out["process_internal_errors"] = errors.total()
        return out

    def control_state(self) -> dict[str, Any]:
        """The control state in force (the shape of ``ControlState.to_dict``)."""
        return dict(self._native.control_state())

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every queued event was handed to a call; ``False`` on timeout."""
        return bool(self._native.wait_drained(float(timeout)))

    def close(self) -> None:
        """End the active call (either route) so its handler can finish."""
        self._native.close()

    def drain_queued(self) -> list[QueuedEvent]:
        """Take everything queued, without a call (tests, other transports)."""
        out = []
        for data in self._native.drain_queued():
            try:
                out.append(queued_event(data))
            except Exception:
                self.count("internal_errors")
        return out

    # ------------------------------------------------------------- control path

    def apply_control(
        self, control: pb.TelemetryControl | bytes | None, generation: int | None = None
    ) -> bool:
        """Apply one control (a message or its serialized bytes); malformed or
        empty ones are counted and ignored. With ``generation``, only while that
        call is still the newest."""
        try:
            if control is None:
                raise ValueError("undecodable TelemetryControl")
            if isinstance(control, bytes | bytearray | memoryview):
                data = bytes(control)
            else:
                data = control.SerializeToString()
        except Exception as exc:
            log.debug("ignoring telemetry control: %s", exc)
            self.count("internal_errors")
            return False
        return bool(self._native.apply_control(data, generation))

    # ------------------------------------------------------------ Rust server

    def serve(self, address: str) -> str:
        """Serve this stream's telemetry calls from a gRPC server on Rust threads.

        ``address`` is ``host:port`` (port 0 picks one) or ``unix:/path`` (a 0600
        socket). Returns the bound address. Raises ``OSError``/``ValueError`` if
        it cannot bind.
        """
        if not self._auth.required:
            auth.warn_open_once()  # the grpcio route warns at its first call
        return str(self._native.serve(address))

    def stop_serving(self) -> None:
        """Stop the server of :meth:`serve` (the active call on it ends)."""
        self._native.stop_serving()

    def server_rounds(self) -> dict[str, int] | None:
        """How the server of :meth:`serve` ran its work, or ``None``.

        ``by_emitters``: rounds run by threads that emitted an event and found
        a batch due (they sent it themselves, with no thread woken);
        ``by_runtime``: rounds run by the server's own thread (a batch whose
        flush time passed with no emit, controls, connections);
        ``emitter_ns``: the time the emitters' rounds took, what sending cost
        the emitting threads.
        """
        rounds = self._native.server_rounds()
        if rounds is None:
            return None
        by_emitters, by_runtime, emitter_ns = rounds
        return {"by_emitters": by_emitters, "by_runtime": by_runtime, "emitter_ns": emitter_ns}

    @property
    def serving(self) -> str | None:
        """The address :meth:`serve` bound, or ``None``."""
        address = self._native.serving
        return None if address is None else str(address)

    # ----------------------------------------------------------- grpcio route

    def _serve(
        self, request_iterator: Iterable[bytes], context: grpc.ServicerContext, batched: bool
    ) -> Iterator[bytes]:
        """Yield what the extension encoded until the call ends or is superseded.

        A message counts as sent once gRPC took it (the generator resumes); if the
        call ends while one is in a send, ``finish`` counts its events as
        ``interrupted_sends`` and hands the rest back to the queue.
        """
        try:
            context.send_initial_metadata(())
        except Exception:
            self.count("internal_errors")
        call = self._native.open_call(batched)
        generation = call.generation
        with self._lock:
            stale = list(self._running)
            self._running[generation] = context
        if stale:
            timer = threading.Timer(TAKEOVER_GRACE_S, self._cancel_stale, (stale,))
            timer.daemon = True
            timer.start()
        threading.Thread(
            target=self._consume_controls,
            args=(request_iterator, generation),
            name="snakepit-telemetry-controls",
            daemon=True,
        ).start()
        try:
            while True:
                try:
                    message = call.next(_WAIT_SLICE_S)
                except StopIteration:
                    return  # superseded or closed
                if message is None:
                    if not context.is_active():
                        return
                    continue
                yield message  # resumes only once gRPC has taken the message
                call.sent()
        finally:
            call.finish()
            with self._lock:
                self._running.pop(generation, None)

    def _consume_controls(self, requests: Iterable[bytes], generation: int) -> None:
        """Apply controls from one call until it ends."""
        apply = self._native.apply_control
        try:
            for data in requests:
                apply(data, generation)
        except Exception:
            # The request side ends with an error when the call is cancelled.
            return


AnyTelemetryStream = TelemetryStream | NativeTelemetryStream
