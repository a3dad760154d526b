"""The committed generated modules match the proto and import as a package."""

from __future__ import annotations

import subprocess
import sys

from .conftest import PY_ROOT


def test_generated_files_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(PY_ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_stub_uses_relative_import() -> None:
    text = (PY_ROOT / "snakepit_telemetry" / "snakepit_bridge_pb2_grpc.py").read_text()
    assert "from . import snakepit_bridge_pb2" in text
    assert "\nimport snakepit_bridge_pb2" not in text


def test_messages_roundtrip() -> None:
    from snakepit_telemetry import snakepit_bridge_pb2 as pb

    ev = pb.TelemetryEvent(event_parts=["a", "b"], timestamp_ns=1, correlation_id="c")
    ev.measurements["x"].int_value = -(2**63)
    assert pb.TelemetryEvent.FromString(ev.SerializeToString()) == ev
