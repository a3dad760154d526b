"""Baseline consumer for bench/throughput.exs: a plain grpcio client.

Reads a worker's StreamTelemetry with the generated stub and reports how
long it took to receive COUNT events, timed from the first event. It is the
ordinary way to consume the stream, so it bounds what the worker can send.

    python bench/python_consumer.py ADDRESS COUNT
"""

import sys
import time

import grpc

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import snakepit_bridge_pb2_grpc as pb_grpc


def main() -> int:
    address, count = sys.argv[1], int(sys.argv[2])
    target = address if not address.startswith("unix:") else address
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        enable = pb.TelemetryControl(toggle=pb.TelemetryToggle(enabled=True))
        calls = stub.StreamTelemetry(iter([enable]))
        print("CONSUMER_READY", flush=True)
        received = 0
        started = 0.0
        for _ in calls:
            if received == 0:
                started = time.perf_counter()
            received += 1
            if received == count:
                break
        print(f"CONSUMER_DONE {received} {time.perf_counter() - started}", flush=True)
        calls.cancel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
