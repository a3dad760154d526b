"""A local client that tries to take a worker's telemetry call over (tests only).

Usage: ``intruder.py ADDRESS MODE RPC`` with MODE ``none`` (no secret), ``wrong``
(another secret) or ``env`` (the secret in ``INTRUDER_SECRET``) and RPC
``batches`` or ``events``. It opens the call, sends ``toggle(false)``, reads
for at most 2 s and prints the status the call ended with (``UNAUTHENTICATED``,
``OK``, ``DEADLINE_EXCEEDED``...) and the number of messages it read.
"""

from __future__ import annotations

import os
import sys

import grpc

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry.telemetry import SECRET_HEADER

METHODS = {
    "batches": "/snakepit.bridge.BridgeService/StreamTelemetryBatches",
    "events": "/snakepit.bridge.BridgeService/StreamTelemetry",
}
WRONG = "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmc"


def main(address: str, mode: str, rpc: str) -> int:
    secret = {"none": None, "wrong": WRONG, "env": os.environ.get("INTRUDER_SECRET")}[mode]
    metadata = () if secret is None else ((SECRET_HEADER, secret),)
    off = pb.TelemetryControl(toggle=pb.TelemetryToggle(enabled=False))
    read = 0
    with grpc.insecure_channel(address) as channel:
        call = channel.stream_stream(
            METHODS[rpc],
            request_serializer=pb.TelemetryControl.SerializeToString,
            response_deserializer=lambda data: data,
        )(iter([off]), metadata=metadata, timeout=2)
        try:
            for _ in call:
                read += 1
            code = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            code = exc.code()
    print(f"{code.name} {read}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
