"""A fake telemetry worker that misbehaves on purpose (test support only).

Speaks raw HTTP/2 and gRPC over plain sockets (the ``h2`` package, no gRPC
server library), so it can send what no real gRPC server would. Used by
``test/snakepit/telemetry/hostile_worker_test.exs``; not part of the shipped
Python package.

    python -u hostile_worker.py [MODE] [--count N] [--flood-bytes B] [--oversized-bytes B]

Listens on 127.0.0.1 (a free port) and prints the port as its first stdout
line. ``MODE`` (default ``good``) is armed from the start, ``N`` times
(default 1; 16 for ``status_codes``); once used up, the worker behaves:

* a good ``StreamTelemetryBatches`` call gets response headers and one
  gRPC-framed ``TelemetryEventBatch`` holding one valid ``python.call.stop``
  event (metadata ``command: "open"``, ``result: <sequence number>``), then
  stays open; ``StreamTelemetry`` (the fallback RPC) gets the same event
  alone; any other path gets a trailers-only UNIMPLEMENTED.

Each stdin line ``MODE [N]`` arms a mode again (answered ``ARMED MODE N``).
A mode that acts on new connections or calls first ends the call that is
open (trailers with grpc-status 0), so the client reconnects into it. The
worker exits when stdin closes.

Modes acting on a new connection, before HTTP/2:

* ``garbage_preface``: once the client's call is out (its HEADERS frame read),
  random bytes (the first one 0xFF: an impossible frame length) instead of the
  server preface and SETTINGS, then waits for the client to hang up.

Modes acting on a new ``StreamTelemetryBatches`` call:

* ``status_codes``: a trailers-only response; the i-th use sends the i-th code
  of 1..11, 13..16, 12 (UNIMPLEMENTED last, so the client falls back to
  ``StreamTelemetry``, which is served properly).
* ``hang_before_headers``: keeps the connection alive (SETTINGS, PING and
  WINDOW_UPDATE handled) but never answers the call.

Modes acting on the open call (the latest good one), after its first event:

* ``garbage_frame``: a well-framed gRPC message of random bytes that no
  protobuf parser accepts (its first byte is a tag with wire type 7), then a
  valid event (``command: "after"``) on the same call.
* ``truncated_payload``: a gRPC message whose protobuf payload stops inside a
  string field (the frame length matches the cut payload), then a valid event.
* ``truncated_end_stream``: a gRPC header announcing 1000 bytes, 10 sent, then
  END_STREAM (no trailers).
* ``close_mid_frame``: an HTTP/2 DATA frame header announcing 1000 bytes, 20
  sent, then the TCP connection is closed.
* ``oversized``: one valid batch message of ``--oversized-bytes`` (default
  100 000) bytes.
* ``invalid_utf8``: one batch of five events: ``utf8-good`` (results g1, g2,
  g3) interleaved with one event whose metadata value and one whose event name
  part is invalid UTF-8 (encoded by hand); then a valid event.
* ``status_after_event``: a valid event, then trailers with grpc-status 13.
* ``hang_after_headers``: a valid event, then the socket is left alone: not
  read, not written, not closed (no PING answers).
* ``flood``: ``--flood-bytes`` (default 32 MiB) of valid batches (events with
  ``command: "flood"``) as fast as flow control allows, then a burst of tiny
  frames (200 batches of one event, each split into 1-byte DATA frames; 1000
  PINGs; 50 SETTINGS; 50 empty DATA frames, under the client's limit), then a
  valid event.
* ``empty_frames``: 1000 empty DATA frames (over the 100 that the Rust h2
  client accepts on a connection), then a valid event.

Every hostile act prints ``HOSTILE <mode> key=value ...`` on stdout just before
it is done; every good call opened prints ``OPEN batches`` or ``OPEN events``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import select
import socket
import struct
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "priv" / "python"))

import h2.config  # noqa: E402
import h2.connection  # noqa: E402
import h2.events  # noqa: E402
import h2.exceptions  # noqa: E402
import h2.settings  # noqa: E402

# The generated messages of the project's proto (priv/python, put on the path above).
pb = importlib.import_module("snakepit_telemetry.snakepit_bridge_pb2")

BATCHES = b"/snakepit.bridge.BridgeService/StreamTelemetryBatches"
EVENTS = b"/snakepit.bridge.BridgeService/StreamTelemetry"

CONNECTION_MODES = {"garbage_preface"}
CALL_MODES = {"status_codes", "hang_before_headers"}
STREAM_MODES = {
    "garbage_frame",
    "truncated_payload",
    "truncated_end_stream",
    "close_mid_frame",
    "oversized",
    "invalid_utf8",
    "status_after_event",
    "hang_after_headers",
    "flood",
    "empty_frames",
}
MODES = {"good"} | CONNECTION_MODES | CALL_MODES | STREAM_MODES

# Every non-OK gRPC status code; UNIMPLEMENTED (12) last: it makes the client
# fall back to StreamTelemetry, which then opens.
STATUS_SEQUENCE = [*range(1, 12), *range(13, 17), 12]

# How long a hung connection is kept before the worker drops it.
HANG_SECONDS = 60.0

_print_lock = threading.Lock()


def say(line: str) -> None:
    with _print_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


# --- Wire encoding -----------------------------------------------------------


def grpc_frame(payload: bytes, announced: int | None = None) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    length = len(payload) if announced is None else announced
    return struct.pack(">BI", 0, length) + payload


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def field(number: int, value: bytes) -> bytes:
    """A length-delimited protobuf field, whatever the bytes are."""
    return varint(number << 3 | 2) + varint(len(value)) + value


def event(command: str, result: str) -> pb.TelemetryEvent:
    ev = pb.TelemetryEvent(
        event_parts=["python", "call", "stop"],
        timestamp_ns=time.time_ns(),
        correlation_id=f"{command}-{result}",
    )
    ev.measurements["duration"].int_value = 1000
    ev.metadata["command"] = command
    ev.metadata["result"] = result
    return ev


def batch(*events: pb.TelemetryEvent) -> bytes:
    return pb.TelemetryEventBatch(events=list(events)).SerializeToString()


def invalid_utf8_batch() -> bytes:
    """Five events; the 2nd and 4th hold invalid UTF-8 in a string field.

    The protobuf library refuses to build those, so they are encoded by hand
    (a message may be split anywhere between fields: the valid part comes from
    the library, the bad field is appended).
    """
    good = [event("utf8-good", f"g{i}").SerializeToString() for i in (1, 2, 3)]
    bad_metadata = event("utf8-bad", "metadata").SerializeToString() + field(
        3, field(1, b"result") + field(2, b"bad-\xff\xfe-value")
    )
    rest = event("utf8-bad", "parts")
    del rest.event_parts[:]
    bad_parts = field(1, b"python") + field(1, b"ca\xc3") + rest.SerializeToString()
    events = [good[0], bad_metadata, good[1], bad_parts, good[2]]
    return b"".join(field(1, e) for e in events)


def truncated_payload() -> bytes:
    """A batch cut inside the last string field of its only event."""
    ev = event("truncated", "cut")
    ev.correlation_id = "truncated-" + "x" * 40
    full = batch(ev)
    return full[: len(full) - 20]


def garbage_payload(size: int = 64) -> bytes:
    # 0x0F: field 1 with wire type 7, which does not exist.
    return b"\x0f" + os.urandom(size - 1)


# --- Shared state ------------------------------------------------------------


class Gone(Exception):
    """The connection is gone (or this worker is done with it)."""


class StreamGone(Exception):
    """The client reset the call being written; the connection may live on."""


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode = "good"
        self.remaining = 0
        self.used = 0
        self.kick = False
        self.active = None  # (Connection, stream id) of the latest good call
        self.seq = 0
        self.connections = 0

    def arm(self, mode: str, count: int) -> None:
        with self.lock:
            self.mode, self.remaining, self.used = mode, count, 0
            self.kick = mode not in STREAM_MODES and mode != "good" and self.active is not None

    def take(self, kinds: set[str]) -> tuple[str, int] | None:
        """Uses the armed mode once if it is one of ``kinds``."""
        with self.lock:
            if self.mode in kinds and self.remaining > 0:
                return self._use()
            return None

    def _use(self) -> tuple[str, int]:
        mode, index = self.mode, self.used
        self.used += 1
        self.remaining -= 1
        if self.remaining == 0:
            self.mode = "good"
        return mode, index

    def action_for(self, conn: Connection) -> tuple[str, int] | None:
        """What the connection holding the open call must do now, if anything."""
        with self.lock:
            if self.active is None or self.active[0] is not conn:
                return None
            sid = self.active[1]
            if self.mode in STREAM_MODES and self.remaining > 0:
                return self._use()[0], sid
            if self.kick:
                self.kick = False
                self.active = None
                return "kick", sid
            return None

    def opened(self, conn: Connection, sid: int) -> None:
        with self.lock:
            self.active = (conn, sid)

    def closed(self, conn: Connection, sid: int | None = None) -> None:
        with self.lock:
            if self.active and self.active[0] is conn and sid in (None, self.active[1]):
                self.active = None

    def next_seq(self) -> int:
        with self.lock:
            self.seq += 1
            return self.seq


# --- One connection ----------------------------------------------------------


class Connection:
    def __init__(self, sock: socket.socket, state: State, options: argparse.Namespace):
        self.sock = sock
        self.state = state
        self.options = options
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.reset: set[int] = set()
        self.ended = False

    def run(self) -> None:
        try:
            if self.state.take(CONNECTION_MODES):
                self.garbage_preface()
                return
            self.serve()
        except (Gone, OSError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.state.closed(self)
            with contextlib.suppress(OSError):
                self.sock.close()

    # -- plumbing --

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data:
            self.sock.sendall(data)

    def pump(self, timeout: float) -> None:
        """Reads and handles what the client sent, waiting up to ``timeout``."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        if readable:
            data = self.sock.recv(65536)
            if not data:
                raise Gone()
            self.handle(self.h2.receive_data(data))
        self.flush()
        if self.ended:
            raise Gone()

    def handle(self, events: list) -> None:
        for ev in events:
            if isinstance(ev, h2.events.RequestReceived):
                self.request(ev.stream_id, dict(ev.headers).get(b":path"))
            elif isinstance(ev, h2.events.DataReceived):
                # Control messages from the client: read and ignored.
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            elif isinstance(ev, h2.events.StreamReset):
                self.reset.add(ev.stream_id)
                self.state.closed(self, ev.stream_id)
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.ended = True

    def send(self, sid: int, data: bytes, chunk: int | None = None) -> None:
        """Sends ``data`` on a stream as flow control allows (``chunk``: frame size)."""
        view = memoryview(data)
        deadline = time.monotonic() + 30
        frames = 0
        while view:
            if sid in self.reset:
                raise StreamGone()
            room = min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)
            if chunk:
                room = min(room, chunk)
            if room <= 0:
                if time.monotonic() > deadline:
                    raise Gone()
                self.pump(0.05)
                continue
            self.h2.send_data(sid, bytes(view[:room]))
            view = view[room:]
            frames += 1
            if not chunk or frames % 256 == 0:
                self.flush()
                # Keep answering PINGs and taking WINDOW_UPDATEs while sending.
                self.pump(0)
        self.flush()

    def respond_headers(self, sid: int) -> None:
        self.h2.send_headers(sid, [(b":status", b"200"), (b"content-type", b"application/grpc")])

    def trailers(self, sid: int, code: int, message: str = "hostile worker") -> None:
        self.state.closed(self, sid)
        self.h2.send_headers(
            sid,
            [(b"grpc-status", str(code).encode()), (b"grpc-message", message.encode())],
            end_stream=True,
        )
        self.flush()

    def good_event(self, sid: int, command: str, batches: bool = True) -> None:
        ev = event(command, str(self.state.next_seq()))
        self.send(sid, grpc_frame(batch(ev) if batches else ev.SerializeToString()))

    # -- serving --

    def serve(self) -> None:
        self.h2.initiate_connection()
        self.flush()
        while True:
            self.pump(0.05)
            action = self.state.action_for(self)
            if action is not None:
                mode, sid = action
                # StreamGone: the client reset the call (e.g. refused a
                # message); the connection lives until the client closes it.
                with contextlib.suppress(StreamGone, h2.exceptions.StreamClosedError):
                    getattr(self, "act_" + mode)(sid)
                self.flush()

    def request(self, sid: int, path: bytes | None) -> None:
        if path == BATCHES:
            hostile = self.state.take(CALL_MODES)
            if hostile is None:
                self.open_call(sid, batches=True)
            elif hostile[0] == "status_codes":
                code = STATUS_SEQUENCE[hostile[1] % len(STATUS_SEQUENCE)]
                self.h2.send_headers(
                    sid,
                    [
                        (b":status", b"200"),
                        (b"content-type", b"application/grpc"),
                        (b"grpc-status", str(code).encode()),
                        (b"grpc-message", b"hostile worker"),
                    ],
                    end_stream=True,
                )
                self.flush()
                say(f"HOSTILE status_codes code={code}")
            else:
                say("HOSTILE hang_before_headers")
        elif path == EVENTS:
            self.open_call(sid, batches=False)
        else:
            self.h2.send_headers(
                sid,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", b"12"),
                ],
                end_stream=True,
            )

    def open_call(self, sid: int, batches: bool) -> None:
        # Marked open before the client can see it open: a mode armed as soon
        # as the client reports the stream open finds this call.
        self.state.opened(self, sid)
        self.respond_headers(sid)
        self.good_event(sid, "open", batches)
        say(f"OPEN {'batches' if batches else 'events'}")

    # -- hostile acts on an open call --

    def act_kick(self, sid: int) -> None:
        self.trailers(sid, 0, "")

    def act_garbage_frame(self, sid: int) -> None:
        payload = garbage_payload()
        say(f"HOSTILE garbage_frame bytes={len(payload)}")
        self.send(sid, grpc_frame(payload))
        self.good_event(sid, "after")

    def act_truncated_payload(self, sid: int) -> None:
        payload = truncated_payload()
        say(f"HOSTILE truncated_payload bytes={len(payload)}")
        self.send(sid, grpc_frame(payload))
        self.good_event(sid, "after")

    def act_truncated_end_stream(self, sid: int) -> None:
        whole = grpc_frame(batch(event("truncated", "0")))
        say("HOSTILE truncated_end_stream announced=1000 sent=10")
        self.state.closed(self, sid)
        self.h2.send_data(sid, grpc_frame(whole[5:15], announced=1000), end_stream=True)
        self.flush()

    def act_close_mid_frame(self, sid: int) -> None:
        self.flush()
        # A DATA frame header (length 1000, type 0, no flags, this stream),
        # then 20 of its 1000 bytes, then the socket closes.
        header = struct.pack(">I", 1000)[1:] + bytes([0, 0]) + struct.pack(">I", sid)
        say("HOSTILE close_mid_frame announced=1000 sent=20")
        self.state.closed(self, sid)
        self.sock.sendall(header + grpc_frame(batch(event("cut", "0")))[:20])
        self.sock.shutdown(socket.SHUT_RDWR)
        raise Gone()

    def act_oversized(self, sid: int) -> None:
        target = self.options.oversized_bytes
        ev = event("oversized", "0")
        ev.metadata["padding"] = "p" * 1000
        one = batch(ev)
        events = [ev] * (target // len(one))
        payload = batch(*events)
        while len(payload) < target:
            events.append(ev)
            payload = batch(*events)
        say(f"HOSTILE oversized bytes={len(payload)}")
        self.state.closed(self, sid)
        self.send(sid, grpc_frame(payload))

    def act_invalid_utf8(self, sid: int) -> None:
        payload = invalid_utf8_batch()
        say("HOSTILE invalid_utf8 good=3 bad=2")
        self.send(sid, grpc_frame(payload))
        self.good_event(sid, "after")

    def act_status_after_event(self, sid: int) -> None:
        self.good_event(sid, "before-status")
        say("HOSTILE status_after_event code=13")
        self.trailers(sid, 13)

    def act_hang_after_headers(self, sid: int) -> None:
        self.good_event(sid, "before-hang")
        say("HOSTILE hang_after_headers")
        self.state.closed(self, sid)
        # Neither read nor write nor close: the client sees silence.
        threading.Event().wait(HANG_SECONDS)
        raise Gone()

    def act_flood(self, sid: int) -> None:
        per_batch = 256
        big = grpc_frame(batch(*[event("flood", str(i)) for i in range(per_batch)]))
        events = sent = 0
        while sent < self.options.flood_bytes:
            self.send(sid, big)
            events += per_batch
            sent += len(big)
        tiny = grpc_frame(batch(event("flood", "tiny")))
        data_frames = empty_frames = pings = settings = 0
        for i in range(200):
            self.send(sid, tiny, chunk=1)
            events += 1
            data_frames += len(tiny)
            if i % 4 == 0:
                # Fewer than h2's lifetime limit of 100 empty frames.
                self.h2.send_data(sid, b"")
                empty_frames += 1
            for j in range(5):
                self.h2.ping(struct.pack(">II", i, j))
            pings += 5
            if i % 4 == 0:
                self.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
                settings += 1
            self.pump(0)
        say(
            f"HOSTILE flood events={events} bytes={sent} one_byte_frames={data_frames} "
            f"empty_frames={empty_frames} pings={pings} settings={settings}"
        )
        self.good_event(sid, "after")

    def act_empty_frames(self, sid: int) -> None:
        say("HOSTILE empty_frames count=1000")
        self.state.closed(self, sid)
        for i in range(1000):
            self.h2.send_data(sid, b"")
            if i % 100 == 99:
                self.flush()
        self.good_event(sid, "after")

    # -- before HTTP/2 --

    def garbage_preface(self) -> None:
        # The client's request goes out first (its preface, SETTINGS, then the
        # call's HEADERS), so the garbage fails that call; sent earlier, it
        # could kill the connection before the call, and tonic would then
        # quietly open another connection for it.
        self.await_request_headers()
        junk = b"\xff" + os.urandom(4095)
        say(f"HOSTILE garbage_preface bytes={len(junk)}")
        self.sock.sendall(junk)
        # Wait for the client to give up on us (or give up waiting).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            readable, _, _ = select.select([self.sock], [], [], 0.1)
            if readable and not self.sock.recv(65536):
                return

    def await_request_headers(self) -> None:
        """Reads the client's bytes until a HEADERS frame (or 5 s) has passed."""
        data = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            offset = 24  # the client connection preface
            while len(data) >= offset + 9:
                length = int.from_bytes(data[offset : offset + 3], "big")
                if data[offset + 3] == 0x1:  # HEADERS
                    return
                offset += 9 + length
            readable, _, _ = select.select([self.sock], [], [], 0.1)
            if readable:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Gone()
                data += chunk


# --- Main --------------------------------------------------------------------


def read_commands(state: State) -> None:
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        mode = words[0]
        if mode not in MODES:
            say(f"ERROR unknown mode {mode}")
            continue
        count = int(words[1]) if len(words) > 1 else default_count(mode)
        state.arm(mode, count)
        say(f"ARMED {mode} {count}")
    # stdin closed: the test is over.
    os._exit(0)


def default_count(mode: str) -> int:
    return len(STATUS_SEQUENCE) if mode == "status_codes" else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="good", choices=sorted(MODES))
    parser.add_argument("--count", type=int, default=None)
    parser.add_argument("--flood-bytes", type=int, default=32 * 1024 * 1024)
    parser.add_argument("--oversized-bytes", type=int, default=100_000)
    options = parser.parse_args()

    state = State()
    count = options.count if options.count is not None else default_count(options.mode)
    state.arm(options.mode, count)

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    say(str(listener.getsockname()[1]))
    threading.Thread(target=read_commands, args=(state,), daemon=True).start()

    while True:
        sock, _ = listener.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with state.lock:
            state.connections += 1
        connection = Connection(sock, state, options)
        threading.Thread(target=connection.run, daemon=True).start()


if __name__ == "__main__":
    main()
