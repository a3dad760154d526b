"""A misbehaving telemetry worker for the Elixir tests (not part of the package).

It accepts every ``StreamTelemetryBatches`` / ``StreamTelemetry`` call, sends
the response headers, waits ``--hold-ms`` (default 0) and ends the call with
status OK, without a single event: a client that resets its reconnect backoff
on every open would reconnect to it as fast as it can.

Prints ``SNAKEPIT_TELEMETRY_READY <address>`` once it listens, then
``CALL <n>`` for each call it accepted; exits when its stdin closes.

Usage: python ending_worker.py [--listen HOST:PORT|unix:/path] [--hold-ms MS]
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

SERVICE = "snakepit.bridge.BridgeService"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--hold-ms", type=int, default=0)
    args = parser.parse_args()

    calls = 0
    lock = threading.Lock()

    def handler(_requests: object, context: grpc.ServicerContext) -> Iterator[bytes]:
        nonlocal calls
        context.send_initial_metadata(())
        with lock:
            calls += 1
            n = calls
        print(f"CALL {n}", flush=True)
        if args.hold_ms:
            time.sleep(args.hold_ms / 1000)
        return
        yield  # a generator: the call ends with status OK and no message

    methods = {
        name: grpc.stream_stream_rpc_method_handler(
            handler, request_deserializer=None, response_serializer=None
        )
        for name in ("StreamTelemetryBatches", "StreamTelemetry")
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
    port = server.add_insecure_port(args.listen)
    if args.listen.startswith("unix:"):
        address = args.listen
    else:
        address = f"{args.listen.rsplit(':', 1)[0]}:{port}"
    server.start()
    print(f"SNAKEPIT_TELEMETRY_READY {address}", flush=True)
    sys.stdin.read()  # until EOF: the owner closed the port
    server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
