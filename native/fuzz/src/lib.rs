//! Invariants the fuzz targets check after every decode.
//!
//! "No panic" is not enough for a telemetry decoder: each target also
//! checks that every event is accounted for in [`StreamStats`], that every
//! name the BEAM would receive as an atom is a compiled-in [`Sym`] (or a
//! registered custom id) and never a string that matches the catalog, that no
//! float is NaN or infinite, and that every limit holds.

use std::collections::HashSet;
use std::sync::atomic::AtomicU64;
use std::sync::Once;

use prost::Message;
use snakepit_telemetry_core::catalog::{self, Sym, Unit};
use snakepit_telemetry_core::custom;
use snakepit_telemetry_core::decode::{
    DecodeConfig, Decoded, Decoder, Event, Key, Limits, Number, Rejected,
    RESERVED_MEASUREMENT_KEYS, RESERVED_METADATA_KEYS,
};
use snakepit_telemetry_core::json::{decode_line, decode_line_bytes, LineError, PREFIX};
use snakepit_telemetry_core::proto::{telemetry_value, TelemetryEvent, TelemetryEventBatch};
use snakepit_telemetry_core::stats::StreamStats;
use snakepit_telemetry_core::wire;

/// A custom event and key the targets register, so the custom-registry
/// paths of the decoder are reachable (the seed corpus uses both).
pub const CUSTOM_EVENT: &str = "fuzz.custom.stop";
pub const CUSTOM_KEY: &str = "fuzz_custom_key";

/// The `max_bytes` the JSON target passes to `decode_line`: small, so
/// `TooLarge` is reachable within libFuzzer's default 4096-byte inputs.
pub const JSON_MAX_BYTES: usize = 2048;

/// Registers [`CUSTOM_EVENT`] and [`CUSTOM_KEY`] once per process.
pub fn init() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        custom::register_event(CUSTOM_EVENT).expect("valid custom event");
        custom::register_key(CUSTOM_KEY).expect("valid custom key");
    });
}

/// The decoder configurations every input is run through: the defaults
/// (what a stream uses, with nanosecond native time, so no scaling), and a
/// tight one whose small limits are easy to hit and whose native time unit
/// scales durations up (so the overflow paths of scaling are reachable).
pub fn configs() -> [DecodeConfig; 2] {
    [
        DecodeConfig::default(),
        DecodeConfig {
            limits: Limits {
                max_event_parts: 4,
                max_part_bytes: 16,
                max_measurements: 3,
                max_metadata: 3,
                max_key_bytes: 12,
                max_value_bytes: 5,
                max_frames: 2,
                max_frame_bytes: 5,
            },
            native_per_sec: 3_000_000_000,
        },
    ]
}

fn get(counter: &AtomicU64) -> u64 {
    StreamStats::get(counter)
}

/// The text a decoded key came from.
fn key_text(key: &Key) -> &str {
    match key {
        Key::Known(sym) => sym.name(),
        Key::Custom(id) => {
            assert_eq!(
                custom::key(CUSTOM_KEY),
                Some(*id),
                "unregistered custom key id"
            );
            CUSTOM_KEY
        }
        Key::Unknown(text) => text,
    }
}

/// Checks one key against the catalog fold: a catalog name is always a
/// [`Sym`], a registered name always its id, and text only for the rest.
fn check_key(key: &Key, lookup: fn(&str) -> Option<Sym>, limits: &Limits) {
    match key {
        Key::Known(sym) => {
            assert_eq!(
                lookup(sym.name()),
                Some(*sym),
                "{sym:?} is not a catalog key here"
            );
            assert_ne!(
                *sym,
                Sym::correlation_id,
                "correlation_id is never a plain key"
            );
            assert!(
                !RESERVED_METADATA_KEYS.contains(&sym.name())
                    && !RESERVED_MEASUREMENT_KEYS.contains(&sym.name()),
                "reserved key {sym:?} kept"
            );
        }
        Key::Custom(id) => assert_eq!(custom::key(CUSTOM_KEY), Some(*id)),
        Key::Unknown(text) => {
            assert_eq!(lookup(text), None, "catalog key {text:?} left as a string");
            assert_eq!(
                custom::key(text),
                None,
                "custom key {text:?} left as a string"
            );
            assert!(text.len() <= limits.max_key_bytes, "key over max_key_bytes");
        }
    }
}

fn measurement_sym(text: &str) -> Option<Sym> {
    catalog::measurement(text).map(|spec| spec.key)
}

/// Invariants that hold for any decoded event, whatever the input was.
pub fn check_decoded(d: &Decoded, limits: &Limits) {
    match d.event {
        Event::Catalog(id) => assert!(id.spec().python.is_some(), "Elixir-only event decoded"),
        Event::Custom(id) => assert_eq!(custom::event(CUSTOM_EVENT), Some(id)),
    }
    assert!(d.measurements.len() <= limits.max_measurements);
    assert!(d.metadata.len() <= limits.max_metadata);
    let mut seen = HashSet::new();
    for (key, number) in &d.measurements {
        check_key(key, measurement_sym, limits);
        assert!(seen.insert(key_text(key)), "duplicate measurement {key:?}");
        if let Number::Float(f) = number {
            assert!(f.is_finite(), "non-finite float {f}");
        }
    }
    seen.clear();
    for (key, value) in &d.metadata {
        check_key(key, catalog::metadata_key, limits);
        assert!(seen.insert(key_text(key)), "duplicate metadata {key:?}");
        assert!(
            value.len() <= limits.max_value_bytes,
            "value over max_value_bytes"
        );
    }
    if let Some(c) = &d.correlation_id {
        assert!(!c.is_empty() && c.len() <= limits.max_value_bytes);
    }
    assert!(d.stacktrace.len() <= limits.max_frames);
    for frame in &d.stacktrace {
        assert!(frame.file.len() <= limits.max_frame_bytes);
        assert!(frame.function.len() <= limits.max_frame_bytes);
    }
}

fn name_is_wellformed(parts: &[String], limits: &Limits) -> bool {
    !parts.is_empty()
        && parts.len() <= limits.max_event_parts
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= limits.max_part_bytes)
}

/// Checks the event a name folds to; `name` is the dotted name as sent.
pub fn check_event_name(name: &str, event: Event) {
    match event {
        Event::Catalog(id) => assert_eq!(id.spec().python, Some(name)),
        Event::Custom(id) => assert_eq!(custom::event(name), Some(id)),
    }
}

/// `s` cut to at most `max` bytes on a character boundary.
fn prefix(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The number a valid wire measurement value becomes, before scaling.
fn wire_number(value: &Option<telemetry_value::Value>) -> Option<Number> {
    match value {
        Some(telemetry_value::Value::IntValue(i)) => Some(Number::Int(*i)),
        Some(telemetry_value::Value::FloatValue(f)) if f.is_finite() => Some(Number::Float(*f)),
        _ => None,
    }
}

/// What a measurement becomes for `key`: scaled to native time units when
/// the catalog says so, `None` when the scaled value does not fit.
fn expected_number(key: &str, n: Number, per_sec: u64) -> Option<Number> {
    let native = catalog::measurement(key).is_some_and(|s| s.unit == Unit::NativeTime);
    if !native || per_sec == 1_000_000_000 {
        return Some(n);
    }
    match n {
        Number::Int(i) => i64::try_from(i128::from(i) * i128::from(per_sec) / 1_000_000_000)
            .ok()
            .map(Number::Int),
        Number::Float(f) => {
            let scaled = f * per_sec as f64 / 1e9;
            scaled.is_finite().then_some(Number::Float(scaled))
        }
    }
}

/// Checks the result of `Decoder::decode(input)` on a fresh `stats`:
/// the event is counted once under the right reason, the name folds to the
/// right catalog entry, and every measurement and metadata entry of the input
/// is either in the output (exactly, or truncated) or counted as dropped.
pub fn check_event(
    input: &TelemetryEvent,
    config: &DecodeConfig,
    result: &Result<Decoded, Rejected>,
    stats: &StreamStats,
) {
    let limits = &config.limits;
    assert_eq!(get(&stats.received), 1);
    let unknown = get(&stats.dropped_unknown_event);
    let malformed = get(&stats.dropped_malformed);
    let wellformed = name_is_wellformed(&input.event_parts, limits);
    let name = input.event_parts.join(".");
    let d = match result {
        Err(Rejected::Malformed) => {
            assert!(!wellformed, "well-formed name rejected as malformed");
            assert_eq!((unknown, malformed), (0, 1));
            return;
        }
        Err(Rejected::UnknownEvent) => {
            assert!(wellformed, "malformed name rejected as unknown");
            assert_eq!(
                catalog::event(&name),
                None,
                "catalog event {name:?} rejected"
            );
            assert_eq!(custom::event(&name), None, "custom event {name:?} rejected");
            assert_eq!((unknown, malformed), (1, 0));
            return;
        }
        Ok(d) => d,
    };
    assert!(wellformed, "malformed name decoded");
    assert_eq!((unknown, malformed), (0, 0));
    check_event_name(&name, d.event);
    check_decoded(d, limits);
    assert_eq!(d.timestamp_ns, input.timestamp_ns);

    // Reserved keys: dropped and counted, whatever their value.
    let reserved_m = input
        .measurements
        .keys()
        .filter(|k| RESERVED_MEASUREMENT_KEYS.contains(&k.as_str()))
        .count() as u64;
    let reserved_md = input
        .metadata
        .keys()
        .filter(|k| RESERVED_METADATA_KEYS.contains(&k.as_str()))
        .count() as u64;
    assert_eq!(get(&stats.reserved_keys_dropped), reserved_m + reserved_md);
    assert_eq!(d.span_id, (input.span_id != 0).then_some(input.span_id));

    // Measurements: kept exactly (scaled where the catalog says so), or
    // dropped and counted.
    let dropped = get(&stats.dropped_measurements);
    assert_eq!(
        d.measurements.len() as u64 + dropped + reserved_m,
        input.measurements.len() as u64,
        "a measurement neither kept nor counted"
    );
    let valid = |key: &String| {
        let value = &input.measurements[key].value;
        !RESERVED_MEASUREMENT_KEYS.contains(&key.as_str())
            && key.len() <= limits.max_key_bytes
            && wire_number(value)
                .and_then(|n| expected_number(key, n, config.native_per_sec))
                .is_some()
    };
    for (key, number) in &d.measurements {
        let text = key_text(key);
        let wire = input
            .measurements
            .get(text)
            .expect("output key not in input");
        let n = wire_number(&wire.value).expect("invalid value kept");
        assert_eq!(
            expected_number(text, n, config.native_per_sec),
            Some(*number)
        );
    }
    if input.measurements.len() <= limits.max_measurements {
        // No entry limit in play: every valid entry is kept.
        let kept = input.measurements.keys().filter(|k| valid(k)).count();
        assert_eq!(
            kept,
            d.measurements.len(),
            "a valid measurement was dropped"
        );
    }

    // Metadata: kept (truncated to max_value_bytes), or dropped and
    // counted; a correlation_id entry only ever feeds the correlation id.
    // A traceback counts as one metadata entry dropped on any event but an
    // exception.
    let corr_entry = input.metadata.get("correlation_id");
    let exception = name.ends_with(".exception");
    let frames_dropped = u64::from(!exception && !input.stacktrace.is_empty());
    let dropped = get(&stats.dropped_metadata);
    assert_eq!(
        d.metadata.len() as u64 + dropped + u64::from(corr_entry.is_some()) + reserved_md,
        input.metadata.len() as u64 + frames_dropped,
        "a metadata entry neither kept nor counted"
    );
    let mut truncated = 0;
    for (key, value) in &d.metadata {
        let wire = input
            .metadata
            .get(key_text(key))
            .expect("output key not in input");
        assert_eq!(value, prefix(wire, limits.max_value_bytes));
        truncated += u64::from(wire.len() > limits.max_value_bytes);
    }
    let plain = input.metadata.len() - usize::from(corr_entry.is_some()) - reserved_md as usize;
    if plain <= limits.max_metadata {
        let kept = input
            .metadata
            .keys()
            .filter(|k| {
                *k != "correlation_id"
                    && !RESERVED_METADATA_KEYS.contains(&k.as_str())
                    && k.len() <= limits.max_key_bytes
            })
            .count();
        assert_eq!(kept, d.metadata.len(), "a valid metadata entry was dropped");
    }
    let corr_source = if input.correlation_id.is_empty() {
        corr_entry.filter(|c| !c.is_empty())
    } else {
        Some(&input.correlation_id)
    };
    let expected_corr = corr_source
        .map(|c| prefix(c, limits.max_value_bytes))
        .filter(|c| !c.is_empty());
    assert_eq!(d.correlation_id.as_deref(), expected_corr);
    truncated += u64::from(corr_source.is_some_and(|c| c.len() > limits.max_value_bytes));
    // Traceback: the innermost max_frames frames, strings bounded.
    if exception {
        let kept = input.stacktrace.len().min(limits.max_frames);
        assert_eq!(d.stacktrace.len(), kept);
        truncated += u64::from(input.stacktrace.len() > limits.max_frames);
        for (out, wire) in d.stacktrace.iter().zip(&input.stacktrace) {
            assert_eq!(out.line, wire.line);
            assert!(wire.file.ends_with(&out.file));
            assert_eq!(out.function, prefix(&wire.function, limits.max_frame_bytes));
            truncated += u64::from(wire.file.len() > limits.max_frame_bytes);
            truncated += u64::from(wire.function.len() > limits.max_frame_bytes);
        }
    } else {
        assert!(d.stacktrace.is_empty());
    }
    assert_eq!(get(&stats.truncated_metadata), truncated);
}

/// The single-event path, as `stream.rs` runs it for `StreamTelemetry`:
/// `wire::decode_event_payload` (a payload that does not decode is one
/// malformed event, counted); returns the event that would be delivered.
pub fn decode_event(data: &[u8], decoder: &mut Decoder, stats: &StreamStats) -> Option<Decoded> {
    let mut out = Vec::new();
    wire::decode_event_payload(data, decoder, stats, &mut out);
    assert!(out.len() <= 1, "one payload gave {} events", out.len());
    out.pop()
}

/// Decodes one `StreamTelemetry` payload and checks it: the event is
/// delivered or counted under one drop reason, a delivered event holds the
/// output invariants, and when the payload is a valid `TelemetryEvent`,
/// [`check_event`] holds for it and the result is what it decodes to.
pub fn fuzz_event(data: &[u8]) {
    init();
    let reference = TelemetryEvent::decode(data).ok();
    for config in configs() {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(config.clone());
        let out = decode_event(data, &mut decoder, &stats);
        if let Some(d) = &out {
            check_decoded(d, &config.limits);
        }
        let received = get(&stats.received);
        assert!(received <= 1, "one payload counted as {received} events");
        assert_eq!(
            received,
            u64::from(out.is_some())
                + get(&stats.dropped_unknown_event)
                + get(&stats.dropped_malformed),
            "received != delivered + dropped"
        );
        let Some(event) = &reference else {
            continue;
        };
        assert_eq!(received, 1);
        let one = StreamStats::default();
        let result = Decoder::new(config.clone()).decode(event.clone(), &one);
        check_event(event, &config, &result, &one);
        assert_eq!(out.is_some(), result.is_ok());
        if let (Some(got), Ok(want)) = (out, result) {
            assert_same(got, want, exact(event, &config.limits));
        }
    }
}

/// Whether every entry of `event` must be kept: which entries an entry limit
/// keeps depends on hash-map order, so two decodes of one event over the
/// limits agree only on counts.
fn exact(event: &TelemetryEvent, limits: &Limits) -> bool {
    event.measurements.len() <= limits.max_measurements
        && event.metadata.len() <= limits.max_metadata
}

fn assert_same(got: Decoded, want: Decoded, exact: bool) {
    if exact {
        assert_eq!(normalized(got), normalized(want));
    } else {
        assert_eq!(summary(&got), summary(&want));
    }
}

/// The batch path, as `stream.rs` runs it: `wire::decode_batch_payload`,
/// which walks the batch and decodes each event on its own (a bad event is
/// dropped and counted; a batch that cannot be walked is counted as a
/// malformed message); returns the events that would be delivered.
pub fn decode_batch(data: &[u8], decoder: &mut Decoder, stats: &StreamStats) -> Vec<Decoded> {
    let mut out = Vec::new();
    wire::decode_batch_payload(data, decoder, stats, &mut out);
    assert_eq!(StreamStats::get(&stats.wire_messages), 1);
    out
}

/// A batch's events with `base_timestamp_ns` added (as `Wire::from_batch`).
fn rebase(batch: TelemetryEventBatch) -> Vec<TelemetryEvent> {
    let mut events = batch.events;
    for event in &mut events {
        event.timestamp_ns = event.timestamp_ns.saturating_add(batch.base_timestamp_ns);
    }
    events
}

/// Decodes one `StreamTelemetryBatches` payload and checks it: every event
/// is delivered or counted under one drop reason, each delivered event holds
/// the output invariants, and when the payload is a valid batch, the result
/// equals decoding its events one by one.
pub fn fuzz_batch(data: &[u8]) {
    init();
    let reference = TelemetryEventBatch::decode(data).ok();
    for config in configs() {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(config.clone());
        let out = decode_batch(data, &mut decoder, &stats);
        for d in &out {
            check_decoded(d, &config.limits);
        }
        assert_eq!(
            get(&stats.received),
            out.len() as u64 + get(&stats.dropped_unknown_event) + get(&stats.dropped_malformed),
            "received != delivered + dropped"
        );
        let Some(batch) = &reference else {
            continue;
        };
        let base = batch.base_timestamp_ns;
        assert_eq!(get(&stats.received), batch.events.len() as u64);
        let mut expected = Vec::new();
        for (wire, event) in batch.events.iter().zip(rebase(batch.clone())) {
            assert_eq!(event.timestamp_ns, wire.timestamp_ns.saturating_add(base));
            let one = StreamStats::default();
            let result = Decoder::new(config.clone()).decode(event.clone(), &one);
            check_event(&event, &config, &result, &one);
            expected.extend(result.ok().map(|d| (d, exact(&event, &config.limits))));
        }
        assert_eq!(
            out.len(),
            expected.len(),
            "batch decode delivers other events"
        );
        for (got, (want, exact)) in out.into_iter().zip(expected) {
            assert_same(got, want, exact);
        }
    }
}

/// What two decodes of one event agree on whatever the hash-map order.
fn summary(d: &Decoded) -> (Event, usize, usize, Option<&str>, i64) {
    (
        d.event,
        d.measurements.len(),
        d.metadata.len(),
        d.correlation_id.as_deref(),
        d.timestamp_ns,
    )
}

/// `d` with its entries in key order (the wire maps are hash maps, so two
/// decodes of the same bytes may list entries in different orders).
fn normalized(mut d: Decoded) -> Decoded {
    d.measurements
        .sort_by(|a, b| key_text(&a.0).cmp(key_text(&b.0)));
    d.metadata
        .sort_by(|a, b| key_text(&a.0).cmp(key_text(&b.0)));
    d
}

/// Decodes one stderr line and checks it: a line without the prefix is not
/// counted; every other line is counted once, under `received` and, when
/// dropped, under one reason; decoded events hold the output invariants and
/// fold the name the JSON gave.
pub fn fuzz_json_line(data: &[u8]) {
    init();
    // The NIF passes the worker's bytes as they are: invalid UTF-8 must be
    // refused and counted, never decoded.
    let Ok(text) = std::str::from_utf8(data) else {
        check_invalid_utf8(data);
        return;
    };
    check_line(text);
    if !text.starts_with(PREFIX) {
        // Also feed the JSON parser when a mutation broke the prefix.
        check_line(&format!("{PREFIX}{text}"));
    }
}

/// A line that is not UTF-8: ignored without the prefix, otherwise refused
/// (too large, or invalid UTF-8) and counted once as malformed.
fn check_invalid_utf8(data: &[u8]) {
    for config in configs() {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(config);
        let result = decode_line_bytes(data, JSON_MAX_BYTES, &mut decoder, &stats);
        if !data.starts_with(PREFIX.as_bytes()) {
            assert_eq!(result.unwrap_err(), LineError::NotTelemetry);
            assert!(stats.snapshot().iter().all(|(_, n)| *n == 0));
            continue;
        }
        let want = if data.len() > JSON_MAX_BYTES {
            LineError::TooLarge
        } else {
            LineError::InvalidUtf8
        };
        assert_eq!(result.unwrap_err(), want);
        assert_eq!(get(&stats.received), 1);
        assert_eq!(get(&stats.dropped_malformed), 1);
    }
}

/// serde_json errors that only a strict parse of a skipped field raises.
const IGNORED_VALUE_ERRORS: &[&str] = &[
    "number out of range",
    "lone leading surrogate",
    "invalid unicode code point",
    "unexpected end of hex escape",
];

fn check_line(line: &str) {
    for config in configs() {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(config.clone());
        let result = decode_line(line, JSON_MAX_BYTES, &mut decoder, &stats);
        let counts = (
            get(&stats.received),
            get(&stats.dropped_unknown_event),
            get(&stats.dropped_malformed),
        );
        match &result {
            Err(LineError::NotTelemetry) => {
                assert!(!line.starts_with(PREFIX));
                assert!(
                    stats.snapshot().iter().all(|(_, n)| *n == 0),
                    "ignored line counted"
                );
                continue;
            }
            Err(LineError::TooLarge) => {
                assert!(line.len() > JSON_MAX_BYTES);
                assert_eq!(counts, (1, 0, 1));
                continue;
            }
            Err(LineError::InvalidJson) | Err(LineError::Rejected(Rejected::Malformed)) => {
                assert_eq!(counts, (1, 0, 1))
            }
            Err(LineError::Rejected(Rejected::UnknownEvent)) => assert_eq!(counts, (1, 1, 0)),
            Err(LineError::InvalidUtf8) => panic!("a valid UTF-8 line refused as invalid UTF-8"),
            Ok(d) => {
                assert_eq!(counts, (1, 0, 0));
                check_decoded(d, &config.limits);
            }
        }
        assert!(line.starts_with(PREFIX) && line.len() <= JSON_MAX_BYTES);
        let json = serde_json::from_str::<serde_json::Value>(line[PREFIX.len()..].trim_end());
        let value = match json {
            Ok(value) => value,
            // serde skips fields the line does not know without checking
            // that their numbers fit an f64 or that their \u escapes are
            // valid UTF-16 (`{"x":2e308,"y":"\ud800", ...}`), which
            // serde_json::Value refuses: harmless, those values are never
            // read (the fields the decoder reads are parsed strictly).
            Err(e)
                if IGNORED_VALUE_ERRORS
                    .iter()
                    .any(|m| e.to_string().starts_with(m)) =>
            {
                continue
            }
            Err(_) => {
                assert_eq!(
                    result.unwrap_err(),
                    LineError::InvalidJson,
                    "invalid JSON accepted"
                );
                continue;
            }
        };
        if let Ok(d) = result {
            let parts: Vec<&str> = value["event_parts"]
                .as_array()
                .expect("decoded without event_parts")
                .iter()
                .map(|p| p.as_str().expect("non-string part"))
                .collect();
            check_event_name(&parts.join("."), d.event);
            assert_eq!(
                Some(d.timestamp_ns),
                value.get("timestamp_ns").map_or(Some(0), |t| t.as_i64())
            );
        }
    }
}
