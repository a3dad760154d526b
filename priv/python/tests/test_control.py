"""Control state: env defaults, reset on each new call, spans under sampling."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import pytest

from snakepit_telemetry import snakepit_bridge_pb2 as pb
from snakepit_telemetry import telemetry
from snakepit_telemetry.telemetry._internal.control import ControlState

from .conftest import Client, wait_until
from .test_stream import filt, names, sampling, send_and_wait, toggle
from .test_telemetry import drain

Connect = Callable[[], Client]
Serve = Callable[[telemetry.AnyTelemetryStream], str]

DEFAULT = {"enabled": True, "default_rate": 1.0, "rules": [], "allow": [], "deny": []}
ENV_KEYS = (
    "SNAKEPIT_TELEMETRY_ENABLED",
    "SNAKEPIT_TELEMETRY_SAMPLING_RATE",
    "SNAKEPIT_TELEMETRY_ALLOW",
    "SNAKEPIT_TELEMETRY_DENY",
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


def set_rule(s: telemetry.AnyTelemetryStream, rate: float, *patterns: str) -> None:
    assert s.apply_control(sampling(rate, *patterns))


# ------------------------------------------------------------------ env defaults


def test_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert telemetry.new_stream().control_state() == DEFAULT
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_ENABLED", " FALSE ")
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "0.25")
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_ALLOW", "python.*, tool.*,,")
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_DENY", "python.secret.*")
    assert telemetry.new_stream().control_state() == {
        "enabled": False,
        "default_rate": 0.25,
        "rules": [],
        "allow": ["python.*", "tool.*"],
        "deny": ["python.secret.*"],
    }


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("SNAKEPIT_TELEMETRY_ENABLED", "yes"),
        ("SNAKEPIT_TELEMETRY_ENABLED", ""),
        ("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "half"),
        ("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "nan"),
        ("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "-1"),
        ("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "1.5"),
        ("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "inf"),
        ("SNAKEPIT_TELEMETRY_ALLOW", " , ,"),
        ("SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "soon"),
        ("SNAKEPIT_TELEMETRY_STATS_INTERVAL_MS", "-5"),
    ],
)
def test_bad_env_values_fall_back(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    with caplog.at_level(logging.DEBUG, logger="snakepit_telemetry.telemetry"):
        s = telemetry.new_stream()
    assert s.control_state() == DEFAULT
    assert s._stats_interval == 1.0
    if value.strip(" ,"):  # blank values are simply "unset"
        assert any(key in r.getMessage() for r in caplog.records)


def test_env_applies_before_first_call(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_SAMPLING_RATE", "0")
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_ALLOW", "keep.*,drop.*")
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_DENY", "drop.*")
    s = telemetry.new_stream()
    telemetry.set_stream(s)
    telemetry.emit("keep.a", {"x": 1})
    telemetry.emit("drop.a", {"x": 1})
    telemetry.emit("other.a", {"x": 1})
    st = s.stats()
    assert (st["dropped_sampled"], st["dropped_filtered"], st["queue_len"]) == (1, 2, 0)
    client = Client(serve(s))
    try:
        send_and_wait(client, s, sampling(1.0))
        telemetry.emit("keep.b", {"x": 1})
        telemetry.emit("drop.b", {"x": 1})
        assert names(client.take(1)) == ["keep.b"]
    finally:
        client.close()


def test_env_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_ENABLED", "false")
    s = telemetry.new_stream()
    s.emit_event("a.b", {"x": 1})
    assert s.stats()["dropped_disabled"] == 1 and s.stats()["enabled"] is False


# ------------------------------------------------------------ reset per call


def test_each_call_starts_from_env_defaults(monkeypatch: pytest.MonkeyPatch, serve: Serve) -> None:
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_DENY", "noisy.*")
    s = telemetry.new_stream()
    telemetry.set_stream(s)
    address = serve(s)
    env_state = {**DEFAULT, "deny": ["noisy.*"]}
    monkeypatch.setenv("SNAKEPIT_TELEMETRY_DENY", "changed.*")  # read once: no effect

    first = Client(address)
    try:
        send_and_wait(first, s, sampling(0.0, "python.*"))
        send_and_wait(first, s, sampling(0.5))
        send_and_wait(first, s, filt(allow=("python.*",)))
        send_and_wait(first, s, toggle(False))
        assert s.control_state() == {
            "enabled": False,
            "default_rate": 0.5,
            "rules": [{"rate": 0.0, "patterns": ["python.*"]}],
            "allow": ["python.*"],
            "deny": [],
        }
    finally:
        first.close()
    assert wait_until(lambda: not s.stats()["active_stream"])
    # Between calls the last state stays in force.
    assert s.control_state()["enabled"] is False

    second = Client(address)
    try:
        assert wait_until(lambda: s.stats()["streams_opened"] == 2)
        assert s.control_state() == env_state
        telemetry.emit("python.call.stop", {"x": 1})  # the old rule is gone
        telemetry.emit("noisy.evt", {"x": 1})  # the env deny is back
        assert names(second.take(1)) == ["python.call.stop"]
        send_and_wait(second, s, sampling(0.0, "python.*"))
        # A takeover resets too, and the superseded call can no longer steer.
        third = Client(address)
        try:
            assert wait_until(lambda: s.stats()["streams_opened"] == 3)
            assert s.control_state() == env_state
            assert second.done.wait(3)
            applied = s.stats()["controls_applied"]
            second.send(toggle(False))
            send_and_wait(third, s, sampling(0.25, "tool.*"))
            assert s.stats()["controls_applied"] == applied + 1
            assert s.control_state() == {
                **env_state,
                "rules": [{"rate": 0.25, "patterns": ["tool.*"]}],
            }
        finally:
            third.close()
    finally:
        second.close()


def test_stale_call_cannot_apply_controls() -> None:
    s = telemetry.new_stream()
    # Generation 0 is not current once any call opened; emulate with close().
    s.close()
    assert s.apply_control(toggle(False), generation=0) is False
    assert s.control_state() == DEFAULT


# ----------------------------------------------------------------- unit level


def test_rule_matching_unit() -> None:
    state = ControlState()
    assert not state.sampling
    for rate, patterns in [
        (0.1, ("a.*",)),
        (0.2, ("a.b.*", "z")),
        (0.3, ("*.c",)),
        (0.4, ("a.*",)),  # replaces the first rule, moves to the end
    ]:
        result = state.apply(sampling(rate, *patterns))
        assert result is not None
        state, truncated = result
        assert truncated == 0
    assert [r.patterns for r in state.rules] == [("a.b.*", "z"), ("*.c",), ("a.*",)]
    assert state.sampling
    assert state.sample_rate_for("a.b.c") == 0.4  # newest matching rule
    assert state.sample_rate_for("x.c") == 0.3
    assert state.sample_rate_for("z") == 0.2
    assert state.sample_rate_for("q") == 1.0
    assert state.sample_rate_for("q") == 1.0  # cached path
    result = state.apply(sampling(0.0))
    assert result is not None
    state = result[0]
    assert state.sample_rate_for("q") == 0.0 and state.sample_rate_for("a.x") == 0.4


def test_emit_signature_unchanged() -> None:
    params = list(inspect.signature(telemetry.emit).parameters)
    assert params == ["event", "measurements", "metadata", "correlation_id"]


# ------------------------------------------------------- spans under sampling


def test_span_sampling_decided_at_start(stream: telemetry.AnyTelemetryStream) -> None:
    # A rule on stop alone does not split spans: the decision uses <name>.start.
    set_rule(stream, 0.0, "*.stop", "*.exception")
    with telemetry.span("python.call"):
        pass
    with pytest.raises(KeyError), telemetry.span("python.call"):
        raise KeyError("x")
    assert [".".join(e.parts) for e in drain(stream)] == [
        "python.call.start",
        "python.call.stop",
        "python.call.start",
        "python.call.exception",
    ]
    # A rule on start drops the whole span, exception included.
    set_rule(stream, 0.0, "python.call.start")
    with telemetry.span("python.call"):
        pass
    with pytest.raises(KeyError), telemetry.span("python.call"):
        raise KeyError("x")
    assert drain(stream) == []
    assert stream.stats()["dropped_sampled"] == 4


def test_span_decision_survives_rate_change(stream: telemetry.AnyTelemetryStream) -> None:
    with telemetry.span("s"):
        set_rule(stream, 0.0, "s.*")  # too late: this span was already kept
    assert len(drain(stream)) == 2
    with telemetry.span("s"):
        set_rule(stream, 1.0, "s.*")  # too late: this span was already dropped
    assert drain(stream) == []


def test_span_toggle_and_filter_still_per_event(stream: telemetry.AnyTelemetryStream) -> None:
    assert stream.apply_control(filt(deny=("*.start",)))
    with telemetry.span("s"):
        pass
    assert [".".join(e.parts) for e in drain(stream)] == ["s.stop"]
    assert stream.apply_control(filt())
    assert stream.apply_control(toggle(False))
    with telemetry.span("s"):
        assert stream.apply_control(toggle(True))
    assert [".".join(e.parts) for e in drain(stream)] == ["s.stop"]
    st = stream.stats()
    assert (st["dropped_filtered"], st["dropped_disabled"], st["dropped_sampled"]) == (1, 1, 0)


def test_spans_stay_whole_over_grpc(stream: telemetry.AnyTelemetryStream, connect: Connect) -> None:
    client = connect()
    send_and_wait(client, stream, sampling(0.5, "python.call.*"))
    for batch in range(10):  # drain between batches so the queue bound never bites
        for i in range(200):
            with telemetry.span("python.call", correlation_id=f"c-{batch * 200 + i}"):
                pass
        assert stream.wait_drained(5)
    st = stream.stats()
    assert st["dropped_queue_full"] == 0
    delivered = client.take(st["sent"])
    client.assert_quiet(0.05)
    starts = {e.correlation_id for e in delivered if e.event_parts[-1] == "start"}
    stops = {e.correlation_id for e in delivered if e.event_parts[-1] == "stop"}
    assert len(starts) + len(stops) == len(delivered)
    assert starts == stops
    # Binomial(2000, 0.5): sd ~22, so +-150 is a ~6.7 sigma bound.
    assert 850 <= len(starts) <= 1150
    assert st["dropped_sampled"] == 2 * (2000 - len(starts))


def test_control_state_json(stream: telemetry.AnyTelemetryStream) -> None:
    import json

    set_rule(stream, 0.5, "a.*", "b.*")
    assert stream.apply_control(pb.TelemetryControl(filter=pb.TelemetryEventFilter(deny=["x"])))
    state = json.loads(json.dumps(stream.control_state()))
    assert state == {**DEFAULT, "rules": [{"rate": 0.5, "patterns": ["a.*", "b.*"]}], "deny": ["x"]}


def test_all_rates_one_skips_sampling() -> None:
    state = ControlState()
    for control in (sampling(1.0, "a.*"), sampling(1.0)):
        result = state.apply(control)
        assert result is not None
        state = result[0]
    assert not state.sampling
    result = state.apply(sampling(0.5, "b.*"))
    assert result is not None and result[0].sampling
