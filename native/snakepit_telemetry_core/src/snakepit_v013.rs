//! Tests: events built exactly as Snakepit v0.13's Python builds them decode
//! to catalog atoms with the same meaning.
//!
//! What Snakepit v0.13 (`nshkrdotcom/snakepit`, tag v0.13.0) sends, read from
//! `priv/python/snakepit_bridge/telemetry/` and its `snakepit_bridge` call
//! sites:
//!
//! * **Framing**: `StreamTelemetry` only, one `TelemetryEvent` per message
//!   (same field numbers as here); `event_parts` is the dotted name split on
//!   `.`; `timestamp_ns` is `time.time_ns()` at emit; `correlation_id` is the
//!   caller's or `""` (never absent).
//! * **Values**: a measurement that is a `bool` is sent as `int_value` (0/1),
//!   an `int` as `int_value`, a `float` as `float_value`, anything else as
//!   `string_value` of `str(value)`; every metadata value is `str(value)`
//!   (so `True` arrives as `"True"`, `None` as `"None"`).
//! * **`telemetry.span(op, metadata, correlation_id)`** sends
//!   `<op>.start` {`system_time`: `time.time_ns()`}, then `<op>.stop`
//!   {`duration`: nanoseconds} or `<op>.exception` {`duration`} with
//!   metadata plus `error_type` (exception class name) and `error_message`
//!   (`str(e)`); all three carry the span's metadata and correlation id.
//! * **Call sites in `snakepit_bridge`**: the showcase adapter's
//!   `telemetry_demo` tool emits `tool.execution.start` {`system_time`}
//!   {`tool`, `operation`}, runs `span("tool.execution", {tool, operation},
//!   cid)` and inside it `tool.result_size` {`bytes`: int} {`tool`}, with the
//!   correlation id of the call (often none: `""`);
//!   `serialization.py` emits `snakepit.serialization.unserializable_marker`
//!   {`first_seen`: 1} {`type`: module-qualified type name} with no
//!   correlation id, once per type and process.
//! * **Snakepit's own catalog** (`Snakepit.Telemetry.Naming`), which
//!   adapters follow: `python.call.start|stop|exception` {`count`, stop also
//!   `duration`}, `python.memory.sampled` {`rss_bytes`, `vms_bytes`},
//!   `python.cpu.sampled` {`cpu_percent`}, `python.gc.completed` {`count`,
//!   `generation`: both measurements}, `python.error.occurred` {`count`},
//!   `tool.execution.start|stop|exception` {`count`, stop also `duration`},
//!   `tool.result_size` {`message_size`}.
//!
//! The catalog takes all of it (see catalog.toml), in the map Snakepit puts
//! each key in.

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::catalog::Sym;
    use crate::decode::{DecodeConfig, Decoded, Decoder, Key, Number};
    use crate::proto::{telemetry_value, TelemetryEvent, TelemetryValue};
    use crate::stats::StreamStats;

    /// A Python value as v0.13's emit sees it.
    #[derive(Clone, Copy)]
    enum Py<'a> {
        Bool(bool),
        Int(i64),
        Float(f64),
        Str(&'a str),
    }

    impl Py<'_> {
        /// `str(value)`, as v0.13 sends every metadata value.
        fn str(self) -> String {
            match self {
                Py::Bool(true) => "True".into(),
                Py::Bool(false) => "False".into(),
                Py::Int(i) => i.to_string(),
                Py::Float(f) => format!("{f:?}"),
                Py::Str(s) => s.into(),
            }
        }

        /// The measurement value v0.13 builds.
        fn measurement(self) -> TelemetryValue {
            let value = match self {
                Py::Bool(b) => telemetry_value::Value::IntValue(i64::from(b)),
                Py::Int(i) => telemetry_value::Value::IntValue(i),
                Py::Float(f) => telemetry_value::Value::FloatValue(f),
                other => telemetry_value::Value::StringValue(other.str()),
            };
            TelemetryValue { value: Some(value) }
        }
    }

    /// Keys and values of a measurements or metadata dict.
    type Pairs<'a> = Vec<(&'a str, Py<'a>)>;

    /// `TelemetryStream.emit` of v0.13: the message it puts on the stream.
    fn v013_event(
        name: &str,
        measurements: &[(&str, Py)],
        metadata: &[(&str, Py)],
        correlation_id: Option<&str>,
    ) -> TelemetryEvent {
        TelemetryEvent {
            event_parts: name.split('.').map(String::from).collect(),
            measurements: measurements
                .iter()
                .map(|(k, v)| (k.to_string(), v.measurement()))
                .collect(),
            metadata: metadata
                .iter()
                .map(|(k, v)| (k.to_string(), v.str()))
                .collect(),
            timestamp_ns: 1_760_000_000_123_456_789,
            correlation_id: correlation_id.unwrap_or("").to_string(),
            // v0.13 has neither field: no span id, no traceback frames.
            span_id: 0,
            stacktrace: Vec::new(),
        }
    }

    fn decode(event: TelemetryEvent, native_per_sec: u64) -> (Decoded, StreamStats) {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(DecodeConfig {
            native_per_sec,
            ..DecodeConfig::default()
        });
        let decoded = decoder.decode(event, &stats).expect("in the catalog");
        (decoded, stats)
    }

    fn python_name(d: &Decoded) -> &'static str {
        d.event.spec().unwrap().python.unwrap()
    }

    fn measurements(d: &Decoded) -> HashMap<&'static str, Number> {
        d.measurements
            .iter()
            .map(|(k, v)| match k {
                Key::Known(sym) => (sym.name(), *v),
                other => panic!("{other:?} of {} is not an atom", python_name(d)),
            })
            .collect()
    }

    fn metadata(d: &Decoded) -> HashMap<&'static str, &str> {
        d.metadata
            .iter()
            .map(|(k, v)| match k {
                Key::Known(sym) => (sym.name(), v.as_str()),
                other => panic!("{other:?} of {} is not an atom", python_name(d)),
            })
            .collect()
    }

    /// Every key folds to an atom and nothing was dropped on the way.
    fn assert_clean(d: &Decoded, stats: &StreamStats) {
        measurements(d);
        metadata(d);
        assert_eq!(StreamStats::get(&stats.dropped_measurements), 0);
        assert_eq!(StreamStats::get(&stats.dropped_metadata), 0);
    }

    /// `telemetry.span(op, metadata, cid)` of v0.13, ending with `stop` or
    /// with an exception.
    fn v013_span(
        op: &str,
        metadata: &[(&str, Py)],
        cid: Option<&str>,
        error: Option<(&str, &str)>,
    ) -> [TelemetryEvent; 2] {
        let start = v013_event(
            &format!("{op}.start"),
            &[("system_time", Py::Int(1_760_000_000_000_000_000))],
            metadata,
            cid,
        );
        let end = match error {
            None => v013_event(
                &format!("{op}.stop"),
                &[("duration", Py::Int(100_250_000))],
                metadata,
                cid,
            ),
            Some((error_type, error_message)) => {
                let mut meta = metadata.to_vec();
                meta.push(("error_type", Py::Str(error_type)));
                meta.push(("error_message", Py::Str(error_message)));
                v013_event(
                    &format!("{op}.exception"),
                    &[("duration", Py::Int(100_250_000))],
                    &meta,
                    cid,
                )
            }
        };
        [start, end]
    }

    #[test]
    fn the_showcase_tool_span_folds_to_atoms() {
        let meta = [
            ("tool", Py::Str("telemetry_demo")),
            ("operation", Py::Str("compute")),
        ];
        for error in [None, Some(("ValueError", "bad input"))] {
            let [start, end] = v013_span("tool.execution", &meta, None, error);
            let (d, stats) = decode(start, 1_000_000_000);
            assert_clean(&d, &stats);
            assert_eq!(python_name(&d), "tool.execution.start");
            assert_eq!(
                d.event.spec().unwrap().name,
                &[
                    Sym::snakepit,
                    Sym::python,
                    Sym::tool,
                    Sym::execution,
                    Sym::start
                ]
            );
            assert_eq!(
                measurements(&d)["system_time"],
                Number::Int(1_760_000_000_000_000_000)
            );
            assert_eq!(metadata(&d)["tool"], "telemetry_demo");
            assert_eq!(metadata(&d)["operation"], "compute");
            // v0.13 sends "" without a correlation id: no correlation_id.
            assert_eq!(d.correlation_id, None);

            let (d, stats) = decode(end, 1_000_000_000);
            assert_clean(&d, &stats);
            assert_eq!(measurements(&d)["duration"], Number::Int(100_250_000));
            assert_eq!(metadata(&d)["operation"], "compute");
            if error.is_some() {
                assert_eq!(python_name(&d), "tool.execution.exception");
                assert_eq!(metadata(&d)["error_type"], "ValueError");
                assert_eq!(metadata(&d)["error_message"], "bad input");
            } else {
                assert_eq!(python_name(&d), "tool.execution.stop");
            }
        }
    }

    #[test]
    fn durations_in_nanoseconds_become_native_units() {
        let [_, stop] = v013_span("tool.execution", &[], Some("cid-1"), None);
        let (d, _) = decode(stop, 1_000_000);
        assert_eq!(measurements(&d)["duration"], Number::Int(100_250));
        assert_eq!(d.correlation_id.as_deref(), Some("cid-1"));
    }

    #[test]
    fn the_showcase_emits_fold_to_atoms() {
        let start = v013_event(
            "tool.execution.start",
            &[("system_time", Py::Int(1_760_000_000_000_000_000))],
            &[
                ("tool", Py::Str("telemetry_demo")),
                ("operation", Py::Str("compute")),
            ],
            Some("abc-123"),
        );
        let (d, stats) = decode(start, 1_000_000_000);
        assert_clean(&d, &stats);
        assert_eq!(d.correlation_id.as_deref(), Some("abc-123"));

        let size = v013_event(
            "tool.result_size",
            &[("bytes", Py::Int(42))],
            &[("tool", Py::Str("telemetry_demo"))],
            None,
        );
        let (d, stats) = decode(size, 1_000_000_000);
        assert_clean(&d, &stats);
        assert_eq!(measurements(&d)["bytes"], Number::Int(42));
        assert_eq!(metadata(&d)["tool"], "telemetry_demo");
    }

    #[test]
    fn the_serialization_marker_folds_to_atoms() {
        let marker = v013_event(
            "snakepit.serialization.unserializable_marker",
            &[("first_seen", Py::Int(1))],
            &[("type", Py::Str("numpy.ndarray"))],
            None,
        );
        let (d, stats) = decode(marker, 1_000_000_000);
        assert_clean(&d, &stats);
        assert_eq!(
            d.event.spec().unwrap().name,
            &[
                Sym::snakepit,
                Sym::python,
                Sym::serialization,
                Sym::unserializable_marker
            ]
        );
        assert_eq!(measurements(&d)["first_seen"], Number::Int(1));
        assert_eq!(metadata(&d)["type"], "numpy.ndarray");
    }

    #[test]
    fn snakepit_catalog_events_with_its_keys_fold_to_atoms() {
        let cases: Vec<(&str, Pairs, Pairs)> = vec![
            ("python.call.start", vec![("count", Py::Int(1))], vec![]),
            (
                "python.call.stop",
                vec![("duration", Py::Int(5_000)), ("count", Py::Int(1))],
                vec![],
            ),
            (
                "python.call.exception",
                vec![("count", Py::Bool(true))],
                vec![
                    ("error_type", Py::Str("KeyError")),
                    ("error_message", Py::Str("'x'")),
                ],
            ),
            (
                "python.memory.sampled",
                vec![
                    ("rss_bytes", Py::Int(10_000_000)),
                    ("vms_bytes", Py::Int(20_000_000)),
                ],
                vec![],
            ),
            (
                "python.cpu.sampled",
                vec![("cpu_percent", Py::Float(12.5))],
                vec![],
            ),
            (
                "python.gc.completed",
                vec![("count", Py::Int(3)), ("generation", Py::Int(2))],
                vec![],
            ),
            ("python.error.occurred", vec![("count", Py::Int(1))], vec![]),
            (
                "tool.execution.start",
                vec![("count", Py::Int(1))],
                vec![("tool", Py::Str("predict"))],
            ),
            (
                "tool.execution.stop",
                vec![("duration", Py::Int(7)), ("count", Py::Int(1))],
                vec![("tool", Py::Str("predict"))],
            ),
            (
                "tool.execution.exception",
                vec![("count", Py::Int(1))],
                vec![("tool", Py::Str("predict"))],
            ),
            (
                "tool.result_size",
                vec![("message_size", Py::Int(512))],
                vec![("tool", Py::Str("predict"))],
            ),
        ];
        for (name, m, meta) in cases {
            let (d, stats) = decode(v013_event(name, &m, &meta, None), 1_000_000_000);
            assert_eq!(python_name(&d), name);
            assert_clean(&d, &stats);
            let got = measurements(&d);
            assert_eq!(got.len(), m.len(), "{name}");
            for (key, value) in &m {
                let want = match value {
                    Py::Bool(b) => Number::Int(i64::from(*b)),
                    Py::Int(i) => Number::Int(*i),
                    Py::Float(f) => Number::Float(*f),
                    _ => unreachable!(),
                };
                assert_eq!(got[key], want, "{name} {key}");
            }
            assert_eq!(metadata(&d).len(), meta.len(), "{name}");
        }
    }

    #[test]
    fn metadata_values_arrive_as_python_str() {
        let ev = v013_event(
            "python.gc.completed",
            &[("collected", Py::Int(4))],
            &[("generation", Py::Int(1))],
            None,
        );
        let (d, stats) = decode(ev, 1_000_000_000);
        assert_clean(&d, &stats);
        // The same key as metadata (this project's Python) stays metadata.
        assert_eq!(metadata(&d)["generation"], "1");
        assert_eq!(measurements(&d)["collected"], Number::Int(4));
    }
}
