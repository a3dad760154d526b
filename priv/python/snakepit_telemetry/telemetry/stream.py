"""TelemetryStream: a bounded event queue drained by one gRPC telemetry call.

Emitters append one small tuple to a deque (no lock, no conversion, on the common
path); the gRPC handler thread converts and encodes. The call is either
``StreamTelemetryBatches`` (many events per message, encoded by
:mod:`._internal.wire`) or plain ``StreamTelemetry`` (one protobuf message per
event) for clients that only know that one. At most one call is active per
stream: a new call takes over from the old one, which returns promptly and hands
back what it had not sent.

Emit takes ownership of the measurements and metadata mappings: they are read
later, on the stream thread, so do not change them after the call. (The native
implementation, :mod:`.native_stream`, converts them during the call instead.)

Environment, read once when a stream is created:

* ``SNAKEPIT_TELEMETRY_QUEUE_SIZE`` (default 1024): the queue bound;
* ``SNAKEPIT_TELEMETRY_ENABLED`` ("true"/"false", default true),
  ``SNAKEPIT_TELEMETRY_SAMPLING_RATE`` (default 1.0) and
  ``SNAKEPIT_TELEMETRY_ALLOW`` / ``SNAKEPIT_TELEMETRY_DENY`` (comma-separated
  globs): the control state before the first call and at the start of each call;
* ``SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS`` (default 50, 0 sends at once): on the
  batched RPC, the least time between two batches unless ``FLUSH_EVENTS`` are
  waiting. An event after a quiet spell goes out at once; under load events
  wait at most this long, and each message carries more of them;
* ``SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS`` (default 1000, 0 disables): minimum gap
  between ``telemetry.python.stats`` events, which carry this stream's counters;
* ``SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES`` (default 4 MiB, Elixir's default
  ``max_message_bytes``; ``Config.worker_env/1`` passes the pool's): no message
  is ever larger. On either RPC an event that would not fit in a message on its
  own is dropped and counted as ``dropped_oversized``; batches stay within
  ``min(wire.MAX_BATCH_BYTES, this)``.

Calls are authenticated (:mod:`._internal.auth`): with a secret
(``SNAKEPIT_TELEMETRY_SECRET``, or ``secret=``), a call without it is refused
with ``UNAUTHENTICATED`` before it can replace the active call, and counted as
``refused_calls``.

Failures are never raised into the caller; they are counted, and every stats
report's ``internal_errors`` adds the failures counted outside any stream (see
:mod:`._internal.errors`).

Each stream has a random ``instance_id``, sent as the metadata of its stats
events (with ``implementation``: ``"python"``): counters start at 0 with each
instance, so Elixir knows from a new ``instance_id`` (a restarted worker) that
the counters started over. A forked
child starts over as a new instance: new id, counters at 0, empty queue (the
queued events are the parent's to send), fresh locks.

Bad values fall back to the defaults (logged at debug level), never raise.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc

from .. import snakepit_bridge_pb2 as pb
from ._internal import auth, convert, env, errors, wire
from ._internal.control import ControlState
from ._internal.wire import BatchEncoder, RawEvent

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "DEFAULT_STATS_INTERVAL_MS",
    "QUEUE_SIZE_ENV",
    "STATS_EVENT",
    "STATS_INTERVAL_ENV",
    "GrpcRoute",
    "TelemetryStream",
]

log = logging.getLogger(__name__)

# Dotted name -> validated parts (None when invalid), filled by convert.event_parts.
_known_names = convert.NAME_CACHE

DEFAULT_QUEUE_SIZE = 1024
QUEUE_SIZE_ENV = "SNAKEPIT_TELEMETRY_QUEUE_SIZE"
# Upper bound on a blocked wait: a safety net in case a wake-up is ever missed.
_WAIT_SLICE_S = 0.5
# Floor for re-checking unchanged counters, so a tiny interval cannot spin.
_STATS_MIN_POLL_S = 0.01
# How long a superseded call may stay blocked in a send (client not reading)
# before it is cancelled so its unsent events move to the new call.
TAKEOVER_GRACE_S = 1.0
# Most events in one StreamTelemetryBatches message (bytes: wire.MAX_BATCH_BYTES).
MAX_BATCH_EVENTS = 2048

MAX_MESSAGE_BYTES_ENV = "SNAKEPIT_TELEMETRY_MAX_MESSAGE_BYTES"
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
STATS_INTERVAL_ENV = "SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS"
FLUSH_INTERVAL_ENV = "SNAKEPIT_TELEMETRY_FLUSH_INTERVAL_MS"
# Each gRPC message costs the worker far more CPU than an event (about 50-100 us
# of mostly kernel time, against 0.1-2 us per event on a small machine), so a
# batch waits until this long after the previous one unless it is already large:
# the message rate, and so that cost, is at most 1000 / this per second, for at
# most this much extra latency (the design allows 100 ms).
DEFAULT_FLUSH_INTERVAL_MS = 50
# A batch this large goes out without waiting for the flush interval (the emit
# that fills it wakes the sender).
FLUSH_EVENTS = 256
# The queue length before the emit that fills a batch.
_FILLS_A_BATCH = FLUSH_EVENTS - 1
DEFAULT_STATS_INTERVAL_MS = 1000
STATS_EVENT = ("telemetry", "python", "stats")
# Counters reported to Elixir in each stats event, in this order.
STATS_MEASUREMENTS = (
    "emitted",
    "sent",
    "dropped_queue_full",
    "dropped_invalid",
    "dropped_disabled",
    "dropped_sampled",
    "dropped_filtered",
    "dropped_oversized",
    "measurements_dropped",
    "internal_errors",
    "interrupted_sends",
    "queue_len",
    "refused_calls",
)

# "emitted" and "enqueued" are derived in _snapshot_locked: the common emit path
# only appends to the queue, so it has no counter to bump.
_COUNTERS = (
    "sent",
    "dropped_queue_full",
    "dropped_invalid",
    "dropped_disabled",
    "dropped_sampled",
    "dropped_filtered",
    # Events too large for one message (max_message_bytes) on their own.
    "dropped_oversized",
    "measurements_dropped",
    # Events whose send was interrupted when their call ended: they may or may
    # not have reached that call's client, and are not sent again.
    "interrupted_sends",
    "internal_errors",
    "streams_opened",
    "controls_applied",
    # Sampling rules dropped because more than MAX_RULES were set.
    "controls_truncated",
    # Stats events handed to a call (never counted in "sent"); counted when
    # yielded, so one cut off by the call ending still counts.
    "stats_reports",
    # StreamTelemetryBatches messages handed to gRPC.
    "batches_sent",
    # Telemetry calls refused for a missing or wrong secret (see _internal.auth).
    "refused_calls",
)


# Key of the stats events' metadata that names the stream instance.
INSTANCE_ID_KEY = "instance_id"
# Key of the stats events' metadata that names the implementation that sent them:
# "python" here, "native" from NativeTelemetryStream.
IMPLEMENTATION_KEY = "implementation"
IMPLEMENTATION = "python"


def _new_instance_id() -> str:
    """A random id for one stream instance (unique across processes and forks)."""
    return os.urandom(8).hex()


# Every stream of this process, of either implementation (the native
# stream registers itself here too), so that a forked child can renew them.
_streams: weakref.WeakSet[Any] = weakref.WeakSet()


def _renew_after_fork() -> None:
    for stream in list(_streams):
        stream._start_over_after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_renew_after_fork)


class _StatsClock:
    """When the next stats report of one call may go out, and what was last sent."""

    __slots__ = ("interval", "last", "next_due")

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.last: tuple[int, ...] | None = None
        self.next_due = 0.0  # the first check always reports

    def enabled(self) -> bool:
        return self.interval > 0

    def due(self, now: float) -> bool:
        return self.interval > 0 and now >= self.next_due


class GrpcRoute:
    """The grpcio servicer side both streams share (``telemetry.add_to_server``):
    ``BridgeService``'s two telemetry methods, the secret check and the
    cancelling of superseded calls. A stream provides ``_serve``, ``_bump``,
    ``_auth``, and ``_running`` (the contexts of unfinished calls by generation,
    guarded by ``_lock``)."""

    _auth: auth.CallAuth
    _lock: threading.Lock
    _running: dict[int, grpc.ServicerContext]

    def _serve(
        self, request_iterator: Iterable[Any], context: grpc.ServicerContext, batched: bool
    ) -> Iterator[Any]:
        raise NotImplementedError

    def _bump(self, counter: str, amount: int = 1) -> None:
        raise NotImplementedError

    def StreamTelemetry(  # noqa: N802 - name fixed by the proto service
        self, request_iterator: Iterable[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        """Serve one StreamTelemetry call: one ``TelemetryEvent`` message per event.

        For clients that do not know ``StreamTelemetryBatches``.
        """
        self._authenticate(context)
        return self._serve(request_iterator, context, batched=False)

    def StreamTelemetryBatches(  # noqa: N802 - name fixed by the proto service
        self, request_iterator: Iterable[Any], context: grpc.ServicerContext
    ) -> Iterator[bytes]:
        """Serve one StreamTelemetryBatches call: encoded ``TelemetryEventBatch`` messages.

        Yields bytes, so it must be registered with an identity response
        serializer, as :func:`snakepit_telemetry.telemetry.add_to_server` does.
        """
        self._authenticate(context)
        return self._serve(request_iterator, context, batched=True)

    def _authenticate(self, context: grpc.ServicerContext) -> None:
        """Refuse (UNAUTHENTICATED, counted) a call without the secret, before
        it touches the active call; see :mod:`._internal.auth`."""
        if not self._auth.admits(context):
            self._bump("refused_calls")
            auth.refuse(context)

    def _cancel_stale(self, generations: list[int]) -> None:
        """Cancel superseded calls still stuck in a send (client not reading)."""
        with self._lock:
            contexts = [self._running[g] for g in generations if g in self._running]
        for context in contexts:
            try:
                context.cancel()
            except Exception:
                self._bump("internal_errors")


class TelemetryStream(GrpcRoute):
    """Bounded, thread-safe telemetry queue plus the StreamTelemetry gRPC handler."""

    def __init__(self, queue_size: int | None = None, *, secret: Any = auth.FROM_ENV) -> None:
        if queue_size is None:
            size = env.positive_int(QUEUE_SIZE_ENV, DEFAULT_QUEUE_SIZE)
        else:
            size = int(queue_size)
        if size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size!r}")
        self._queue_size = size
        self._queue: deque[RawEvent] = deque()
        # The queue bound for the lock-free emit path, or 0 when the control state
        # needs the full path (disabled, filtering or sampling).
        self._fast_cap = 0
        # Stream threads asleep on an empty queue; emit wakes them only then.
        self._idle = 0
        # Events that left the queue for a call (or drain_queued) for good.
        self._taken = 0
        # Emits that did not reach the queue (dropped or failed at emit).
        self._refused = 0
        # Hot paths take the bare lock (cheaper than going through the Condition).
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        # Read once: every new call starts again from these defaults.
        self._default_control = ControlState.from_env(os.environ)
        self._set_control(self._default_control)
        self._stats_interval = env.seconds_from_ms(STATS_INTERVAL_ENV, DEFAULT_STATS_INTERVAL_MS)
        self._flush_interval = env.seconds_from_ms(FLUSH_INTERVAL_ENV, DEFAULT_FLUSH_INTERVAL_MS)
        self._max_message_bytes = env.positive_int(MAX_MESSAGE_BYTES_ENV, DEFAULT_MAX_MESSAGE_BYTES)
        self._batch_bytes = min(wire.MAX_BATCH_BYTES, self._max_message_bytes)
        self._counts = dict.fromkeys(_COUNTERS, 0)
        # Events taken off the queue by the active call but not yet handed to gRPC.
        self._in_flight = 0
        # Generation of the active call; bumping it tells an older call to stop.
        self._generation = 0
        self._active: int | None = None
        # Calls whose handler has not returned yet, by generation.
        self._running: dict[int, grpc.ServicerContext] = {}
        self._random = random.Random()
        self._instance_id = _new_instance_id()
        # The secret every call must carry (the process's, from the environment,
        # unless given; None: calls are not checked).
        self._auth = auth.CallAuth(secret)
        _streams.add(self)

    def _start_over_after_fork(self) -> None:
        """In a forked child: become a new instance (see the module docstring).

        Only the forking thread exists in the child; a lock that another thread
        held at the fork would never be released, so every lock is new.
        """
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue = deque()
        self._idle = 0
        self._taken = 0
        self._refused = 0
        self._in_flight = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._active = None
        self._running = {}
        self._random = random.Random()
        self._instance_id = _new_instance_id()

    # ------------------------------------------------------------------ emit path

    def emit_event(
        self,
        event: str | Sequence[str],
        measurements: Mapping[str, Any] | None = None,
        metadata: Mapping[Any, Any] | None = None,
        correlation_id: str | None = None,
        sampled: bool | None = None,
        span_id: int = 0,
        stacktrace: tuple[tuple[str, int, str], ...] = (),
    ) -> None:
        """Queue one event without blocking; never raises (failures are counted).

        ``sampled`` is a sampling decision made earlier (see :meth:`sample`); spans
        pass it so their start and stop are kept or dropped together. ``None``
        samples this event on its own. Span events pass their ``span_id`` (see
        :mod:`._internal.spans`), and an exception event its ``stacktrace``.
        """
        try:
            # The common case, kept to a few operations: a known-good name and a
            # control state that needs no decision (see _fast_cap). The core
            # ``emit`` inlines these same lines.
            if sampled is not False and type(event) is str:
                parts = _known_names.get(event)
                queue = self._queue
                queued = len(queue)
                if parts is not None and queued < self._fast_cap:
                    queue.append(
                        (
                            parts,
                            measurements,
                            metadata,
                            correlation_id,
                            time.time_ns(),
                            span_id,
                            stacktrace,
                        )
                    )
                    # A full batch goes without waiting for the flush time.
                    if self._idle or queued == _FILLS_A_BATCH:
                        self.wake()
                    return
            self._emit(event, measurements, metadata, correlation_id, sampled, span_id, stacktrace)
        except Exception:
            # _emit only raises before it counts anything, so the event is
            # dropped and counted here.
            with self._cond:
                self._refused += 1
                self._counts["internal_errors"] += 1

    def wake(self) -> None:
        """Wake the stream thread waiting for events (emit calls this when it sleeps)."""
        with self._cond:
            self._cond.notify_all()

    def _emit(
        self,
        event: object,
        raw_measurements: object,
        raw_metadata: object,
        correlation_id: object,
        sampled: bool | None = None,
        span_id: int = 0,
        stacktrace: tuple[tuple[str, int, str], ...] = (),
    ) -> None:
        timestamp_ns = time.time_ns()
        control = self._control
        parts = convert.event_parts(event)
        reason: str | None = None
        if parts is None:
            reason = "dropped_invalid"
        elif not control.enabled:
            reason = "dropped_disabled"
        else:
            name = None
            if control.filtering:
                name = ".".join(parts)
                if not control.allowed(name):
                    reason = "dropped_filtered"
            if reason is None:
                if sampled is None:
                    if control.sampling:
                        rate = control.sample_rate_for(name or ".".join(parts))
                        if rate < 1.0 and self._random.random() >= rate:
                            reason = "dropped_sampled"
                elif not sampled:
                    reason = "dropped_sampled"
        if reason is None and len(self._queue) >= self._queue_size:
            # Unlocked pre-check: under overload, skip the conversion work for an
            # event that cannot be queued anyway (rechecked under the lock below).
            reason = "dropped_queue_full"
        if reason is not None:
            with self._lock:
                self._refused += 1
                self._counts[reason] += 1
            return

        assert parts is not None
        # Converted later, on the stream thread (see _convert and wire.BatchEncoder).
        item = (
            parts,
            raw_measurements,
            raw_metadata,
            correlation_id,
            timestamp_ns,
            span_id if type(span_id) is int and 0 < span_id < 1 << 64 else 0,
            stacktrace if type(stacktrace) is tuple else (),
        )
        queue = self._queue
        with self._lock:
            if len(queue) >= self._queue_size:
                self._refused += 1
                self._counts["dropped_queue_full"] += 1
                return
            queue.append(item)
            if self._idle or len(queue) == FLUSH_EVENTS:
                self._cond.notify_all()

    def sample(self, event: str | Sequence[str]) -> bool:
        """Make a sampling decision for ``event`` under the current rules.

        Returns ``True`` for invalid names so that ``emit`` counts them as invalid.
        """
        control = self._control
        if not control.sampling:
            return True
        parts = convert.event_parts(event)
        if parts is None:
            return True
        rate = control.sample_rate_for(".".join(parts))
        return rate >= 1.0 or self._random.random() < rate

    def sample_rate(self, event: str) -> float:
        """The sampling rate in force for the dotted ``event`` name (1.0 when not sampling)."""
        control = self._control
        return control.sample_rate_for(event) if control.sampling else 1.0

    def _bump(self, counter: str, amount: int = 1) -> None:
        """Increment a counter; the lock keeps counts exact across threads."""
        with self._cond:
            self._counts[counter] += amount

    # ---------------------------------------------------------------- inspection

    @property
    def implementation(self) -> str:
        """``"python"`` (``NativeTelemetryStream`` says ``"native"``)."""
        return IMPLEMENTATION

    @property
    def queue_size(self) -> int:
        """The queue bound."""
        return self._queue_size

    @property
    def instance_id(self) -> str:
        """This stream instance's id, sent with its stats events (see the module docstring)."""
        return self._instance_id

    def _set_control(self, control: ControlState) -> None:
        """Swap the control state; caller holds the lock (or is the constructor)."""
        self._control = control
        passthrough = control.enabled and not control.filtering and not control.sampling
        self._fast_cap = self._queue_size if passthrough else 0

    def _snapshot_locked(self) -> dict[str, int]:
        """All counters, including the derived ones; caller holds the lock.

        Every event that reached the queue is either still there or was taken
        (``_taken``): appends happen outside the lock but are atomic, so this is
        a consistent count.
        """
        out = dict(self._counts)
        enqueued = self._taken + len(self._queue)
        out["enqueued"] = enqueued
        out["emitted"] = enqueued + self._refused
        return out

    def stats(self) -> dict[str, int | bool]:
        """A snapshot of all counters plus queue and stream state."""
        with self._cond:
            out: dict[str, int | bool] = dict(self._snapshot_locked())
            out["queue_len"] = len(self._queue)
            out["in_flight"] = self._in_flight
            out["queue_size"] = self._queue_size
            out["active_stream"] = self._active is not None
            out["enabled"] = self._control.enabled
            out["max_message_bytes"] = self._max_message_bytes
        # Failures outside any stream; the reported internal_errors include them.
        out["process_internal_errors"] = errors.total()
        return out

    def control_state(self) -> dict[str, Any]:
        """The control state in force, as a JSON-able dict (see ``ControlState``)."""
        return self._control.to_dict()

    def _stats_values(self) -> tuple[int, ...]:
        """The reported counters, in ``STATS_MEASUREMENTS`` order; caller holds the lock.

        ``internal_errors`` is this stream's plus the process-wide count of
        failures outside any stream (:mod:`._internal.errors`).
        """
        counts = self._snapshot_locked()
        counts["internal_errors"] += errors.total()
        return tuple(
            len(self._queue) if key == "queue_len" else counts[key] for key in STATS_MEASUREMENTS
        )

    def wait_drained(self, timeout: float) -> bool:
        """Wait until every queued event was handed to gRPC; ``False`` on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, _WAIT_SLICE_S))
        return True

    def close(self) -> None:
        """End the active call (if any) so its handler thread can finish."""
        with self._cond:
            self._generation += 1
            self._active = None
            self._cond.notify_all()

    # ------------------------------------------------------------- control path

    def apply_control(
        self, control: pb.TelemetryControl | None, generation: int | None = None
    ) -> bool:
        """Apply one control message; malformed or empty ones are counted and ignored.

        With ``generation``, the control is applied only while that call is still the
        newest, so a superseded call cannot leak state into its successor.
        """
        try:
            if control is None:
                raise ValueError("undecodable TelemetryControl")
            with self._cond:
                if generation is not None and self._generation != generation:
                    return False
                result = self._control.apply(control)
                if result is None:
                    raise ValueError("TelemetryControl without a control field")
                control_state, truncated = result
                self._set_control(control_state)
                self._counts["controls_applied"] += 1
                if truncated:
                    self._counts["controls_truncated"] += truncated
            return True
        except Exception as exc:
            log.debug("ignoring telemetry control: %s", exc)
            self._bump("internal_errors")
            return False

    def _consume_controls(
        self, requests: Iterable[pb.TelemetryControl | None], generation: int
    ) -> None:
        """Apply controls from one call until it ends or is superseded."""
        try:
            for control in requests:
                if self._generation != generation:
                    return
                self.apply_control(control, generation)
        except Exception:
            # The request side ends with an error when the call is cancelled; that is
            # the normal way for this thread to finish.
            return

    # ---------------------------------------------------------------- gRPC side

    def _serve(
        self,
        request_iterator: Iterable[pb.TelemetryControl | None],
        context: grpc.ServicerContext,
        batched: bool,
    ) -> Iterator[Any]:
        """Apply controls and yield queued events until the call ends or is superseded.

        Whatever is queued when the thread wakes goes out at once (in batches of
        at most ``MAX_BATCH_EVENTS`` on the batched RPC): batches grow with load
        and no event waits for company. Stats events are interleaved directly
        (not through the queue): one right away, then whenever a reported counter
        changed and the interval has passed.
        """
        try:
            # Sends response headers now, so the client's call completes even before
            # the first event exists.
            context.send_initial_metadata(())
        except Exception:
            self._bump("internal_errors")

        finished = threading.Event()
        with self._cond:
            self._generation += 1
            generation = self._generation
            self._active = generation
            stale = list(self._running)
            self._running[generation] = context
            self._counts["streams_opened"] += 1
            # Elixir re-sends its whole desired state on each call; start clean so
            # a rule from an earlier call cannot survive.
            self._set_control(self._default_control)
            self._cond.notify_all()  # wakes a previous call so it can step aside
        if stale:
            timer = threading.Timer(TAKEOVER_GRACE_S, self._cancel_stale, (stale,))
            timer.daemon = True
            timer.start()

        def on_done() -> None:
            finished.set()
            with self._cond:
                self._cond.notify_all()

        if not context.add_callback(on_done):
            finished.set()  # the call already terminated

        threading.Thread(
            target=self._consume_controls,
            args=(request_iterator, generation),
            name="snakepit-telemetry-controls",
            daemon=True,
        ).start()

        # Events taken for this call; batch[done:] are not handed to gRPC yet.
        batch: list[RawEvent] = []
        done = 0
        in_doubt = 0  # events of the message suspended in a yield, if any
        clock = _StatsClock(self._stats_interval)
        encoder = BatchEncoder() if batched else None
        next_flush = 0.0  # monotonic time before which a small batch waits
        try:
            while True:
                with self._cond:
                    while (
                        not self._queue and self._generation == generation and not finished.is_set()
                    ):
                        now = time.monotonic()
                        if clock.due(now):
                            break
                        timeout = _WAIT_SLICE_S
                        if clock.enabled():
                            timeout = min(timeout, clock.next_due - now)
                        self._idle += 1
                        try:
                            # Emitters append without the lock; checking again after
                            # announcing the sleep closes the gap before the wait.
                            if not self._queue:
                                self._cond.wait(timeout)
                        finally:
                            self._idle -= 1
                        if not context.is_active():
                            finished.set()
                    if self._generation != generation or finished.is_set():
                        return
                    if encoder is not None and self._queue and len(self._queue) < FLUSH_EVENTS:
                        pause = next_flush - time.monotonic()
                        if pause > 0 and not clock.due(time.monotonic() + pause):
                            # Not idle: emitters need not wake us. A takeover or
                            # close still does (notify_all), checked right after.
                            self._cond.wait(pause)
                            if self._generation != generation or finished.is_set():
                                return
                    report = self._stats_report_locked(clock, encoder)
                    batch = self._take_locked()
                    done = 0
                    self._in_flight += len(batch)
                if report is not None:
                    yield report
                while done < len(batch):
                    if self._generation != generation or finished.is_set():
                        return  # superseded: the finally block hands the rest back
                    if clock.due(time.monotonic()):
                        with self._cond:
                            report = self._stats_report_locked(clock, encoder)
                        if report is not None:
                            yield report
                            continue  # re-check the generation before sending more
                    if encoder is None:
                        count = 1
                        msg, sent = self._build(batch[done])
                    else:
                        msg, count, sent = self._encode(encoder, batch, done)
                    if sent:
                        in_doubt = count
                        yield msg  # resumes only once gRPC has taken the message
                        in_doubt = 0
                        next_flush = time.monotonic() + self._flush_interval
                    done += count
                    with self._cond:
                        self._in_flight -= count
                        self._counts["sent"] += sent
                        if encoder is not None and sent:
                            self._counts["batches_sent"] += 1
                        if not self._in_flight:
                            self._cond.notify_all()
        finally:
            self._finish_call(generation, deque(batch[done:]), in_doubt)

    def _take_locked(self) -> list[RawEvent]:
        """Take everything queued right now; caller holds the lock.

        ``popleft`` until empty rather than copy-and-clear: emitters append
        without the lock, and an append between a copy and a clear would be lost.
        """
        queue = self._queue
        popleft = queue.popleft
        taken = [popleft() for _ in range(len(queue))]
        self._taken += len(taken)
        return taken

    def drain_queued(self) -> list[convert.QueuedEvent]:
        """Take and convert everything queued, without a gRPC call.

        For tests and for embedding the queue in another transport; conversion
        drops are counted as on the stream thread.
        """
        with self._cond:
            taken = self._take_locked()
        out = []
        for item in taken:
            converted = self._convert(item)
            if converted is not None:
                out.append(converted)
        return out

    def _stats_report_locked(
        self, clock: _StatsClock, encoder: BatchEncoder | None
    ) -> pb.TelemetryEvent | bytes | None:
        """A stats event if one is due and a counter changed; caller holds the lock.

        An unchanged check is retried after at most ``_WAIT_SLICE_S`` so a change is
        noticed promptly even while the queue is idle.
        """
        now = time.monotonic()
        if not clock.due(now):
            return None
        values = self._stats_values()
        if values == clock.last:
            clock.next_due = now + max(_STATS_MIN_POLL_S, min(_WAIT_SLICE_S, clock.interval))
            return None
        clock.last = values
        clock.next_due = now + clock.interval
        msg: pb.TelemetryEvent | bytes
        try:
            if encoder is None:
                msg = pb.TelemetryEvent(event_parts=STATS_EVENT, timestamp_ns=time.time_ns())
                for key, value in zip(STATS_MEASUREMENTS, values, strict=True):
                    msg.measurements[key].int_value = value
                msg.metadata[INSTANCE_ID_KEY] = self._instance_id
                msg.metadata[IMPLEMENTATION_KEY] = IMPLEMENTATION
            else:
                report = dict(zip(STATS_MEASUREMENTS, values, strict=True))
                metadata = {INSTANCE_ID_KEY: self._instance_id, IMPLEMENTATION_KEY: IMPLEMENTATION}
                msg = encoder.encode(
                    [(STATS_EVENT, report, metadata, None, time.time_ns(), *wire.NO_SPAN_FIELDS)]
                )[0]
        except Exception:
            self._counts["internal_errors"] += 1
            return None
        self._counts["stats_reports"] += 1
        return msg

    def _convert(self, item: RawEvent) -> convert.QueuedEvent | None:
        """Apply the conversion rules to a raw queued event, counting what they drop."""
        converted, dropped, failed = convert.from_raw(item)
        if dropped or failed:
            with self._cond:
                self._counts["measurements_dropped"] += dropped
                self._counts["internal_errors"] += failed
        return converted

    def _build(self, item: RawEvent) -> tuple[pb.TelemetryEvent | None, int]:
        """One event as a protobuf message, and 1 (or ``(None, 0)``, counted, on failure).

        A message over ``max_message_bytes`` is never sent: it is dropped and
        counted as ``dropped_oversized``.
        """
        converted = self._convert(item)
        if converted is None:
            return None, 0
        try:
            msg = convert.to_proto(converted)
            oversized = msg.ByteSize() > self._max_message_bytes
        except Exception:
            self._bump("internal_errors")
            return None, 0
        if oversized:
            self._bump("dropped_oversized")
            return None, 0
        return msg, 1

    def _encode(
        self, encoder: BatchEncoder, batch: list[RawEvent], start: int
    ) -> tuple[bytes, int, int]:
        """A batch message from ``batch[start:]``: payload, events used, events in it."""
        items = batch[start : start + MAX_BATCH_EVENTS]
        try:
            payload, consumed, encoded, dropped, failed, oversized = encoder.encode(
                items, self._batch_bytes
            )
        except Exception:
            self._bump("internal_errors", len(items))
            return b"", len(items), 0
        if dropped or failed or oversized:
            with self._cond:
                self._counts["measurements_dropped"] += dropped
                self._counts["internal_errors"] += failed
                self._counts["dropped_oversized"] += oversized
        return payload, consumed, encoded

    def _finish_call(self, generation: int, unsent: deque[RawEvent], in_doubt: int) -> None:
        """Return unsent events to the queue front and clear the active marker.

        Events whose ``yield`` was interrupted (call cancelled mid-send) are not
        returned: they may have reached the client, and delivering twice is worse.
        """
        with self._cond:
            self._in_flight -= len(unsent)
            for _ in range(min(in_doubt, len(unsent))):
                unsent.popleft()
                self._counts["interrupted_sends"] += 1
            self._taken -= len(unsent)
            self._queue.extendleft(reversed(unsent))
            if self._active == generation:
                self._active = None
            self._running.pop(generation, None)
            self._cond.notify_all()
