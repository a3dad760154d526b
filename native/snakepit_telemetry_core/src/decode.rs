//! Turns wire events into catalog events, with every value checked.
//!
//! The result holds [`Sym`]s for everything the catalog knows and owned
//! strings for everything it does not, so the NIF can build terms without
//! ever creating an atom from Python bytes.

use crate::catalog::{self, EventId, Sym, Unit};
use crate::custom;
use crate::proto::{telemetry_value, TelemetryEvent, TelemetryFrame};
use crate::stats::StreamStats;

/// A measurement or metadata key: a catalog atom, a registered custom key,
/// or the original text.
#[derive(Clone, Debug, PartialEq)]
pub enum Key {
    Known(Sym),
    Custom(u32),
    Unknown(String),
}

/// Which event: one of the catalog, or one an application registered.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Catalog(EventId),
    Custom(u32),
}

impl Event {
    /// The catalog entry, for catalog events.
    pub fn spec(self) -> Option<&'static catalog::EventSpec> {
        match self {
            Event::Catalog(id) => Some(id.spec()),
            Event::Custom(_) => None,
        }
    }
}

/// A measurement value that is safe to encode as an Erlang number.
#[derive(Copy, Clone, Debug, PartialEq)]
pub enum Number {
    Int(i64),
    /// Always finite: NaN and infinities are dropped before they get here.
    Float(f64),
}

/// One event that passed the catalog and limits.
#[derive(Clone, Debug, PartialEq)]
pub struct Decoded {
    pub event: Event,
    pub measurements: Vec<(Key, Number)>,
    pub metadata: Vec<(Key, String)>,
    pub correlation_id: Option<String>,
    /// The wire timestamp (nanoseconds since the Unix epoch), as sent.
    pub timestamp_ns: i64,
    /// The emit time in the receiving VM's `:native` units (wall clock,
    /// comparable with `System.system_time/0`); `None` when the worker sent
    /// no timestamp (0) or it does not fit.
    pub emit_time: Option<i64>,
    /// The span the event belongs to (start, stop or exception); `None`
    /// outside spans and from workers that predate span ids.
    pub span_id: Option<u64>,
    /// Exception events only: the Python traceback, innermost frame first,
    /// bounded by [`Limits::max_frames`] and [`Limits::max_frame_bytes`].
    pub stacktrace: Vec<Frame>,
}

/// One frame of a Python traceback, with bounded strings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub file: String,
    /// 0 when unknown.
    pub line: u32,
    pub function: String,
}

/// Metadata keys that Elixir sets on every Python event (or on span events)
/// and Python must not: dropped from a Python event's metadata, whichever the
/// event, and counted in `reserved_keys_dropped`, so a handler never sees a
/// binary key beside the real atom key. (`correlation_id` is not here: a
/// metadata entry of that name is the fallback for the dedicated field.)
pub const RESERVED_METADATA_KEYS: &[&str] = &[
    "node",
    "pool_name",
    "worker_id",
    "telemetry_span_context",
    "emit_time",
    "kind",
    "reason",
    "stacktrace",
];

/// Measurement keys Python must not send: `monotonic_time` is this VM's
/// monotonic clock, which Elixir derives; no Python clock can give it.
pub const RESERVED_MEASUREMENT_KEYS: &[&str] = &["monotonic_time"];

/// Why a whole event was dropped.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Rejected {
    UnknownEvent,
    Malformed,
}

/// Size limits applied to every event. Values over a limit are counted and
/// dropped (keys, entries, events) or truncated (metadata values), never
/// passed through and never a crash.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_event_parts: usize,
    pub max_part_bytes: usize,
    pub max_measurements: usize,
    pub max_metadata: usize,
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    /// Traceback frames kept (the innermost ones); more are dropped and the
    /// event counts once in `truncated_metadata`.
    pub max_frames: usize,
    /// Bytes kept of a frame's file and function (a longer file keeps its
    /// end, the file name; a longer function its start); each cut counts in
    /// `truncated_metadata`.
    pub max_frame_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_event_parts: 8,
            max_part_bytes: 64,
            max_measurements: 32,
            max_metadata: 32,
            max_key_bytes: 128,
            max_value_bytes: 4096,
            max_frames: 32,
            max_frame_bytes: 256,
        }
    }
}

/// Everything decoding needs besides the event itself.
#[derive(Clone, Debug)]
pub struct DecodeConfig {
    pub limits: Limits,
    /// Erlang `:native` time units per second on the receiving VM; wire
    /// nanoseconds are scaled to it.
    pub native_per_sec: u64,
}

impl Default for DecodeConfig {
    fn default() -> Self {
        DecodeConfig {
            limits: Limits::default(),
            native_per_sec: 1_000_000_000,
        }
    }
}

/// A reusable decoder; it keeps a scratch buffer for event-name lookups.
#[derive(Debug)]
pub struct Decoder {
    config: DecodeConfig,
    name: String,
}

impl Decoder {
    pub fn new(config: DecodeConfig) -> Self {
        Decoder {
            config,
            name: String::with_capacity(64),
        }
    }

    /// Decodes one event and updates `stats` for everything dropped on the
    /// way. Counts `received`; the caller counts what happens afterwards.
    pub fn decode(
        &mut self,
        event: TelemetryEvent,
        stats: &StreamStats,
    ) -> Result<Decoded, Rejected> {
        StreamStats::add(&stats.received, 1);
        let result = self.decode_inner(event, stats);
        match result {
            Err(Rejected::UnknownEvent) => StreamStats::add(&stats.dropped_unknown_event, 1),
            Err(Rejected::Malformed) => StreamStats::add(&stats.dropped_malformed, 1),
            Ok(_) => {}
        }
        result
    }

    fn decode_inner(
        &mut self,
        event: TelemetryEvent,
        stats: &StreamStats,
    ) -> Result<Decoded, Rejected> {
        let id = self.lookup_event(&event.event_parts)?;
        let limits = &self.config.limits;

        let mut dropped_measurements = 0u64;
        let mut measurements = Vec::with_capacity(event.measurements.len().min(8));
        let mut reserved = 0u64;
        for (key, value) in event.measurements {
            if RESERVED_MEASUREMENT_KEYS.contains(&key.as_str()) {
                reserved += 1;
                continue;
            }
            if measurements.len() >= limits.max_measurements || key.len() > limits.max_key_bytes {
                dropped_measurements += 1;
                continue;
            }
            let known = catalog::measurement(&key);
            let number = value.value.and_then(|v| match v {
                telemetry_value::Value::IntValue(i) => Some(Number::Int(i)),
                telemetry_value::Value::FloatValue(f) if f.is_finite() => Some(Number::Float(f)),
                // NaN and infinities have no Erlang float; strings are not
                // measurements. Both are dropped and counted.
                telemetry_value::Value::FloatValue(_) | telemetry_value::Value::StringValue(_) => {
                    None
                }
            });
            let Some(number) = number else {
                dropped_measurements += 1;
                continue;
            };
            let (key, number) = match known {
                Some(spec) => match self.scale(spec.unit, number) {
                    Some(scaled) => (Key::Known(spec.key), scaled),
                    None => {
                        dropped_measurements += 1;
                        continue;
                    }
                },
                None => (unknown_or_custom(key), number),
            };
            measurements.push((key, number));
        }

        let mut dropped_metadata = 0u64;
        let mut truncated = 0u64;
        let mut correlation_id = non_empty(event.correlation_id);
        let mut metadata = Vec::with_capacity(event.metadata.len().min(8));
        for (key, mut value) in event.metadata {
            if RESERVED_METADATA_KEYS.contains(&key.as_str()) {
                reserved += 1;
                continue;
            }
            let known = catalog::metadata_key(&key);
            if known == Some(Sym::correlation_id) {
                // The dedicated field wins; the metadata entry is only a
                // fallback, and never a second `correlation_id` key.
                if correlation_id.is_none() {
                    correlation_id =
                        non_empty(truncate(value, limits.max_value_bytes, &mut truncated));
                }
                continue;
            }
            if metadata.len() >= limits.max_metadata || key.len() > limits.max_key_bytes {
                dropped_metadata += 1;
                continue;
            }
            value = truncate(value, limits.max_value_bytes, &mut truncated);
            let key = match known {
                Some(sym) => Key::Known(sym),
                None => unknown_or_custom(key),
            };
            metadata.push((key, value));
        }
        let correlation_id =
            correlation_id.map(|c| truncate(c, limits.max_value_bytes, &mut truncated));

        let span_id = (event.span_id != 0).then_some(event.span_id);
        let stacktrace = if event.stacktrace.is_empty() {
            Vec::new()
        } else if self.name.ends_with(".exception") {
            frames(event.stacktrace, limits, &mut truncated)
        } else {
            // Only an exception has a traceback; on any other event the
            // frames are dropped (counted once, as one metadata entry).
            dropped_metadata += 1;
            Vec::new()
        };
        let emit_time = match event.timestamp_ns {
            0 => None,
            t => match self.scale(Unit::NativeTime, Number::Int(t)) {
                Some(Number::Int(native)) => Some(native),
                _ => None,
            },
        };

        StreamStats::add(&stats.dropped_measurements, dropped_measurements);
        StreamStats::add(&stats.dropped_metadata, dropped_metadata);
        StreamStats::add(&stats.truncated_metadata, truncated);
        StreamStats::add(&stats.reserved_keys_dropped, reserved);
        Ok(Decoded {
            event: id,
            measurements,
            metadata,
            correlation_id,
            timestamp_ns: event.timestamp_ns,
            emit_time,
            span_id,
            stacktrace,
        })
    }

    fn lookup_event(&mut self, parts: &[String]) -> Result<Event, Rejected> {
        let limits = &self.config.limits;
        if parts.is_empty() || parts.len() > limits.max_event_parts {
            return Err(Rejected::Malformed);
        }
        self.name.clear();
        for (i, part) in parts.iter().enumerate() {
            if part.is_empty() || part.len() > limits.max_part_bytes {
                return Err(Rejected::Malformed);
            }
            if i > 0 {
                self.name.push('.');
            }
            self.name.push_str(part);
        }
        match catalog::event(&self.name) {
            Some(id) => Ok(Event::Catalog(id)),
            None => custom::event(&self.name)
                .map(Event::Custom)
                .ok_or(Rejected::UnknownEvent),
        }
    }

    /// Converts wire units to what Elixir expects; `None` if the result does
    /// not fit.
    fn scale(&self, unit: Unit, n: Number) -> Option<Number> {
        let per_sec = self.config.native_per_sec;
        if unit != Unit::NativeTime || per_sec == 1_000_000_000 {
            return Some(n);
        }
        match n {
            Number::Int(i) => {
                let scaled = i128::from(i) * i128::from(per_sec) / 1_000_000_000;
                i64::try_from(scaled).ok().map(Number::Int)
            }
            Number::Float(f) => {
                let scaled = f * per_sec as f64 / 1e9;
                scaled.is_finite().then_some(Number::Float(scaled))
            }
        }
    }
}

/// The innermost `max_frames` frames with bounded strings.
fn frames(wire: Vec<TelemetryFrame>, limits: &Limits, truncated: &mut u64) -> Vec<Frame> {
    if wire.len() > limits.max_frames {
        *truncated += 1;
    }
    wire.into_iter()
        .take(limits.max_frames)
        .map(|f| Frame {
            file: truncate_start(f.file, limits.max_frame_bytes, truncated),
            line: f.line,
            function: truncate(f.function, limits.max_frame_bytes, truncated),
        })
        .collect()
}

/// Keeps the last `max` bytes of `s` (on a character boundary): the end of
/// a path names the file.
fn truncate_start(s: String, max: usize, truncated: &mut u64) -> String {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    *truncated += 1;
    s[start..].to_string()
}

fn unknown_or_custom(key: String) -> Key {
    match custom::key(&key) {
        Some(id) => Key::Custom(id),
        None => Key::Unknown(key),
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(mut s: String, max: usize, truncated: &mut u64) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        *truncated += 1;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::TelemetryValue;
    use std::collections::HashMap;

    fn int(i: i64) -> TelemetryValue {
        TelemetryValue {
            value: Some(telemetry_value::Value::IntValue(i)),
        }
    }

    fn float(f: f64) -> TelemetryValue {
        TelemetryValue {
            value: Some(telemetry_value::Value::FloatValue(f)),
        }
    }

    fn event(name: &str) -> TelemetryEvent {
        TelemetryEvent {
            event_parts: name.split('.').map(String::from).collect(),
            timestamp_ns: 42,
            ..Default::default()
        }
    }

    fn decoder() -> Decoder {
        Decoder::new(DecodeConfig::default())
    }

    fn sorted<T: Clone>(mut v: Vec<(Key, T)>) -> Vec<(Key, T)> {
        v.sort_by_key(|(k, _)| format!("{k:?}"));
        v
    }

    #[test]
    fn decodes_a_catalog_event() {
        let stats = StreamStats::default();
        let mut ev = event("python.call.stop");
        ev.measurements = HashMap::from([("duration".into(), int(1500))]);
        ev.metadata = HashMap::from([
            ("command".into(), "predict".into()),
            ("model".into(), "bert".into()),
        ]);
        ev.correlation_id = "abc-123".into();

        let d = decoder().decode(ev, &stats).unwrap();
        assert_eq!(d.event.spec().unwrap().python, Some("python.call.stop"));
        assert_eq!(
            d.measurements,
            vec![(Key::Known(Sym::duration), Number::Int(1500))]
        );
        assert_eq!(
            sorted(d.metadata),
            vec![
                (Key::Known(Sym::command), "predict".to_string()),
                (Key::Unknown("model".into()), "bert".to_string()),
            ]
        );
        assert_eq!(d.correlation_id.as_deref(), Some("abc-123"));
        assert_eq!(d.timestamp_ns, 42);
        assert_eq!(StreamStats::get(&stats.received), 1);
    }

    #[test]
    fn unknown_events_are_rejected_and_counted() {
        let stats = StreamStats::default();
        let mut d = decoder();
        for name in ["python.call", "zz.random.evt", "python.call.stop.extra"] {
            assert_eq!(d.decode(event(name), &stats), Err(Rejected::UnknownEvent));
        }
        assert_eq!(StreamStats::get(&stats.dropped_unknown_event), 3);
        assert_eq!(StreamStats::get(&stats.received), 3);
    }

    #[test]
    fn malformed_names_are_rejected_and_counted() {
        let stats = StreamStats::default();
        let mut d = decoder();
        let cases = [
            vec![],
            vec!["python".to_string(), String::new(), "stop".to_string()],
            vec!["x".repeat(65)],
            vec!["a".to_string(); 9],
        ];
        for parts in cases {
            let ev = TelemetryEvent {
                event_parts: parts,
                ..Default::default()
            };
            assert_eq!(d.decode(ev, &stats), Err(Rejected::Malformed));
        }
        assert_eq!(StreamStats::get(&stats.dropped_malformed), 4);
    }

    #[test]
    fn registered_custom_events_and_keys_are_decoded() {
        let stats = StreamStats::default();
        let mut d = decoder();
        assert_eq!(
            d.decode(event("decode_test.inference.stop"), &stats),
            Err(Rejected::UnknownEvent)
        );
        let id = custom::register_event("decode_test.inference.stop").unwrap();
        let key = custom::register_key("decode_test_model").unwrap();
        let mut ev = event("decode_test.inference.stop");
        ev.metadata = HashMap::from([("decode_test_model".into(), "bert".into())]);
        ev.measurements = HashMap::from([("duration".into(), int(5))]);
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(out.event, Event::Custom(id));
        assert_eq!(out.metadata, vec![(Key::Custom(key), "bert".to_string())]);
        assert_eq!(
            out.measurements,
            vec![(Key::Known(Sym::duration), Number::Int(5))]
        );
    }

    #[test]
    fn unknown_keys_stay_strings() {
        let stats = StreamStats::default();
        let mut ev = event("tool.result_size");
        ev.measurements = HashMap::from([("zz_new_key".into(), int(7)), ("bytes".into(), int(9))]);
        ev.metadata = HashMap::from([("zz_meta".into(), "v".into())]);
        let d = decoder().decode(ev, &stats).unwrap();
        assert_eq!(
            sorted(d.measurements),
            vec![
                (Key::Known(Sym::bytes), Number::Int(9)),
                (Key::Unknown("zz_new_key".into()), Number::Int(7)),
            ]
        );
        assert_eq!(
            d.metadata,
            vec![(Key::Unknown("zz_meta".into()), "v".into())]
        );
    }

    #[test]
    fn bad_measurement_values_are_dropped_and_counted() {
        let stats = StreamStats::default();
        let mut ev = event("python.call.stop");
        ev.measurements = HashMap::from([
            ("nan".into(), float(f64::NAN)),
            ("inf".into(), float(f64::INFINITY)),
            ("neg_inf".into(), float(f64::NEG_INFINITY)),
            (
                "text".into(),
                TelemetryValue {
                    value: Some(telemetry_value::Value::StringValue("12".into())),
                },
            ),
            ("empty".into(), TelemetryValue { value: None }),
            ("ok".into(), float(0.5)),
        ]);
        let d = decoder().decode(ev, &stats).unwrap();
        assert_eq!(
            d.measurements,
            vec![(Key::Unknown("ok".into()), Number::Float(0.5))]
        );
        assert_eq!(StreamStats::get(&stats.dropped_measurements), 5);
    }

    #[test]
    fn durations_are_scaled_to_native_units() {
        let stats = StreamStats::default();
        let mut d = Decoder::new(DecodeConfig {
            native_per_sec: 1_000_000,
            ..DecodeConfig::default()
        });
        let mut ev = event("python.call.stop");
        ev.measurements = HashMap::from([("duration".into(), int(5_000_000))]);
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(
            out.measurements,
            vec![(Key::Known(Sym::duration), Number::Int(5_000))]
        );

        let mut ev = event("tool.result_size");
        ev.measurements = HashMap::from([("bytes".into(), int(5_000_000))]);
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(
            out.measurements,
            vec![(Key::Known(Sym::bytes), Number::Int(5_000_000))]
        );
    }

    #[test]
    fn limits_drop_or_truncate_and_count() {
        let stats = StreamStats::default();
        let mut d = Decoder::new(DecodeConfig {
            limits: Limits {
                max_metadata: 2,
                max_value_bytes: 4,
                max_key_bytes: 8,
                ..Limits::default()
            },
            ..DecodeConfig::default()
        });
        let mut ev = event("python.call.start");
        ev.metadata = HashMap::from([
            ("a".into(), "éééé".into()),
            ("b".into(), "ok".into()),
            ("c".into(), "x".into()),
            ("much_too_long_key".into(), "x".into()),
        ]);
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(out.metadata.len(), 2);
        for (_, v) in &out.metadata {
            assert!(v.len() <= 4);
        }
        assert_eq!(StreamStats::get(&stats.dropped_metadata), 2);
        let truncated = StreamStats::get(&stats.truncated_metadata);
        let kept_a = out
            .metadata
            .iter()
            .any(|(k, _)| *k == Key::Unknown("a".into()));
        assert_eq!(truncated, u64::from(kept_a));
    }

    #[test]
    fn correlation_id_comes_from_the_field_then_metadata_never_twice() {
        let stats = StreamStats::default();
        let mut d = decoder();
        let mut ev = event("python.call.start");
        ev.metadata = HashMap::from([("correlation_id".into(), "from-meta".into())]);
        let out = d.decode(ev.clone(), &stats).unwrap();
        assert_eq!(out.correlation_id.as_deref(), Some("from-meta"));
        assert!(out.metadata.is_empty());

        ev.correlation_id = "from-field".into();
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(out.correlation_id.as_deref(), Some("from-field"));
        assert!(out.metadata.is_empty());
    }

    fn frame(file: &str, line: u32, function: &str) -> TelemetryFrame {
        TelemetryFrame {
            file: file.into(),
            line,
            function: function.into(),
        }
    }

    #[test]
    fn reserved_metadata_keys_are_dropped_and_counted_never_duplicated() {
        let stats = StreamStats::default();
        let mut ev = event("python.call.exception");
        ev.metadata = RESERVED_METADATA_KEYS
            .iter()
            .map(|k| (k.to_string(), "spoofed".to_string()))
            .chain([("command".to_string(), "predict".to_string())])
            .collect();
        ev.measurements = HashMap::from([
            ("monotonic_time".into(), int(1)),
            ("duration".into(), int(5)),
        ]);
        let out = decoder().decode(ev, &stats).unwrap();
        assert_eq!(
            out.metadata,
            vec![(Key::Known(Sym::command), "predict".to_string())]
        );
        assert_eq!(
            out.measurements,
            vec![(Key::Known(Sym::duration), Number::Int(5))]
        );
        assert_eq!(
            StreamStats::get(&stats.reserved_keys_dropped),
            RESERVED_METADATA_KEYS.len() as u64 + 1
        );
        // Dropped keys are not entries over the limit.
        assert_eq!(StreamStats::get(&stats.dropped_metadata), 0);
        assert_eq!(StreamStats::get(&stats.dropped_measurements), 0);
    }

    #[test]
    fn reserved_keys_do_not_use_up_the_metadata_limit() {
        let stats = StreamStats::default();
        let mut d = Decoder::new(DecodeConfig {
            limits: Limits {
                max_metadata: 1,
                ..Limits::default()
            },
            ..DecodeConfig::default()
        });
        let mut ev = event("python.call.start");
        ev.metadata = HashMap::from([
            ("worker_id".into(), "w-evil".into()),
            ("node".into(), "evil@host".into()),
            ("command".into(), "predict".into()),
        ]);
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(
            out.metadata,
            vec![(Key::Known(Sym::command), "predict".to_string())]
        );
        assert_eq!(StreamStats::get(&stats.reserved_keys_dropped), 2);
    }

    #[test]
    fn span_id_and_traceback_are_decoded() {
        let stats = StreamStats::default();
        let mut d = decoder();
        let mut ev = event("python.call.exception");
        ev.span_id = u64::MAX;
        ev.stacktrace = vec![frame("app/tools.py", 42, "predict"), frame("", 0, "")];
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(out.span_id, Some(u64::MAX));
        assert_eq!(
            out.stacktrace,
            vec![
                Frame {
                    file: "app/tools.py".into(),
                    line: 42,
                    function: "predict".into()
                },
                Frame {
                    file: String::new(),
                    line: 0,
                    function: String::new()
                },
            ]
        );

        let mut ev = event("python.call.start");
        ev.span_id = 7;
        let out = d.decode(ev, &stats).unwrap();
        assert_eq!(out.span_id, Some(7));
        assert!(out.stacktrace.is_empty());
    }

    #[test]
    fn a_traceback_outside_an_exception_event_is_dropped_and_counted() {
        let stats = StreamStats::default();
        let mut ev = event("python.call.stop");
        ev.stacktrace = vec![frame("a.py", 1, "f")];
        let out = decoder().decode(ev, &stats).unwrap();
        assert!(out.stacktrace.is_empty());
        assert_eq!(StreamStats::get(&stats.dropped_metadata), 1);
    }

    #[test]
    fn a_traceback_is_bounded_in_frames_and_bytes() {
        let stats = StreamStats::default();
        let mut ev = event("tool.execution.exception");
        let long_file = format!("/{}/é/tools.py", "d".repeat(1000));
        let mut wire: Vec<TelemetryFrame> = (0..100)
            .map(|i| frame("x.py", i, &format!("f{i}")))
            .collect();
        wire[0] = frame(&long_file, 1, &"g".repeat(1000));
        ev.stacktrace = wire;
        let out = decoder().decode(ev, &stats).unwrap();
        let limits = Limits::default();
        assert_eq!(out.stacktrace.len(), limits.max_frames);
        // The innermost frames are kept, in order.
        assert_eq!(out.stacktrace[1].function, "f1");
        assert_eq!(
            out.stacktrace.last().unwrap().line,
            limits.max_frames as u32 - 1
        );
        let first = &out.stacktrace[0];
        assert!(first.file.len() <= limits.max_frame_bytes);
        assert!(first.file.ends_with("/tools.py"), "{}", first.file);
        assert!(first.function.len() <= limits.max_frame_bytes);
        // frames over the limit (1), the file (1) and the function (1).
        assert_eq!(StreamStats::get(&stats.truncated_metadata), 3);
    }

    #[test]
    fn emit_time_is_the_timestamp_in_native_units() {
        let stats = StreamStats::default();
        let mut ev = event("python.call.stop");
        ev.timestamp_ns = 1_700_000_000_123_456_789;
        let out = decoder().decode(ev.clone(), &stats).unwrap();
        assert_eq!(out.emit_time, Some(1_700_000_000_123_456_789));

        let mut micro = Decoder::new(DecodeConfig {
            native_per_sec: 1_000_000,
            ..DecodeConfig::default()
        });
        let out = micro.decode(ev.clone(), &stats).unwrap();
        assert_eq!(out.emit_time, Some(1_700_000_000_123_456));

        ev.timestamp_ns = 0;
        assert_eq!(micro.decode(ev, &stats).unwrap().emit_time, None);
    }

    #[test]
    fn an_event_from_a_worker_without_span_ids_still_decodes() {
        // The bytes an old worker sends: fields 1..5 only, as its own
        // generated code encodes them.
        let old = TelemetryEvent {
            event_parts: vec!["python".into(), "call".into(), "stop".into()],
            measurements: HashMap::from([("duration".into(), int(9))]),
            timestamp_ns: 1_000,
            correlation_id: "c".into(),
            ..Default::default()
        };
        let mut bytes = Vec::new();
        prost::Message::encode(&old, &mut bytes).unwrap();
        // Nothing past field 5 is on the wire.
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            let (tag, wire_type) = prost::encoding::decode_key(&mut rest).unwrap();
            assert!(tag <= 5, "field {tag}");
            prost::encoding::skip_field(wire_type, tag, &mut rest, Default::default()).unwrap();
        }
        let parsed: TelemetryEvent = prost::Message::decode(&bytes[..]).unwrap();
        let stats = StreamStats::default();
        let out = decoder().decode(parsed, &stats).unwrap();
        assert_eq!(out.span_id, None);
        assert!(out.stacktrace.is_empty());
        assert_eq!(out.emit_time, Some(1_000));
        assert_eq!(
            out.measurements,
            vec![(Key::Known(Sym::duration), Number::Int(9))]
        );
    }
}
