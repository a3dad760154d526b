//! The stderr path: telemetry events written by a worker as JSON lines
//! (`SNAKEPIT_TELEMETRY_EVENT {...}`), for adapters that cannot serve the
//! gRPC stream.
//!
//! A line is parsed with serde_json into the same `TelemetryEvent` the gRPC
//! path receives and then goes through the same [`Decoder`], so both paths
//! apply the same catalog, atom safety, limits and counters, and produce the
//! same events.

use std::collections::HashMap;

use serde::Deserialize;
use serde_json::Value;

use crate::decode::{Decoded, Decoder, Rejected};
use crate::proto::{telemetry_value, TelemetryEvent, TelemetryFrame, TelemetryValue};
use crate::stats::StreamStats;

/// What precedes the JSON object on a telemetry line.
pub const PREFIX: &str = "SNAKEPIT_TELEMETRY_EVENT ";

#[derive(Deserialize)]
struct Line {
    event_parts: Vec<String>,
    #[serde(default)]
    measurements: HashMap<String, Value>,
    #[serde(default)]
    metadata: HashMap<String, Value>,
    #[serde(default)]
    timestamp_ns: i64,
    #[serde(default)]
    correlation_id: String,
    /// As in `TelemetryEvent`: a span's id (a JSON integer, 1..2^64-1);
    /// anything else means no span id.
    #[serde(default)]
    span_id: Value,
    /// As in `TelemetryEvent`: `[{"file": .., "line": .., "function": ..}]`,
    /// innermost first; entries of another shape are skipped.
    #[serde(default)]
    stacktrace: Value,
}

/// Why a line gave no event.
#[derive(Debug, PartialEq, Eq)]
pub enum LineError {
    /// Not a telemetry line at all (ordinary worker output).
    NotTelemetry,
    /// Longer than the limit; not parsed.
    TooLarge,
    /// A telemetry line that is not valid UTF-8 (a torn or corrupted
    /// write): dropped whole, as an event with invalid UTF-8 is on the gRPC
    /// path, rather than decoded lossily into text nobody wrote.
    InvalidUtf8,
    /// A telemetry line whose JSON does not have the expected shape.
    InvalidJson,
    /// Parsed, then dropped by the decoder.
    Rejected(Rejected),
}

/// Decodes one output line. `max_bytes` bounds the line before parsing.
pub fn decode_line(
    line: &str,
    max_bytes: usize,
    decoder: &mut Decoder,
    stats: &StreamStats,
) -> Result<Decoded, LineError> {
    decode_line_bytes(line.as_bytes(), max_bytes, decoder, stats)
}

/// Decodes one output line as the bytes a worker wrote, which need not be
/// UTF-8. In order: a line without the prefix is [`LineError::NotTelemetry`]
/// (not counted); then the size is checked (so an oversized line costs
/// nothing more), then UTF-8, then the JSON. Every telemetry line counts in
/// `received` and in exactly one of `delivered` (by the caller) or a
/// `dropped_*` counter: too large, invalid UTF-8 and invalid JSON count as
/// `dropped_malformed`.
pub fn decode_line_bytes(
    line: &[u8],
    max_bytes: usize,
    decoder: &mut Decoder,
    stats: &StreamStats,
) -> Result<Decoded, LineError> {
    let json = line
        .strip_prefix(PREFIX.as_bytes())
        .ok_or(LineError::NotTelemetry)?;
    let malformed = |error| {
        StreamStats::add(&stats.received, 1);
        StreamStats::add(&stats.dropped_malformed, 1);
        Err(error)
    };
    if line.len() > max_bytes {
        return malformed(LineError::TooLarge);
    }
    let Ok(json) = std::str::from_utf8(json) else {
        return malformed(LineError::InvalidUtf8);
    };
    // JSON's own whitespace only: `str::trim` would also take Unicode
    // spaces (a vertical tab, U+00A0, ...) that no JSON text may hold.
    let json = json.trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'));
    // An object only: serde would also fill the fields from a JSON array.
    let parsed = json
        .starts_with('{')
        .then(|| serde_json::from_str::<Line>(json));
    let parsed: Line = match parsed {
        Some(Ok(parsed)) => parsed,
        _ => return malformed(LineError::InvalidJson),
    };
    decoder
        .decode(to_event(parsed), stats)
        .map_err(LineError::Rejected)
}

fn to_event(line: Line) -> TelemetryEvent {
    let measurements = line
        .measurements
        .into_iter()
        .map(|(key, value)| {
            let value = match value {
                Value::Number(n) => match n.as_i64() {
                    Some(i) => Some(telemetry_value::Value::IntValue(i)),
                    None => n.as_f64().map(telemetry_value::Value::FloatValue),
                },
                // "NaN", "Infinity": the decoder drops and counts non-numbers,
                // as it drops NaN arriving over gRPC.
                Value::String(s) => Some(telemetry_value::Value::StringValue(s)),
                _ => None,
            };
            (key, TelemetryValue { value })
        })
        .collect();
    let metadata = line
        .metadata
        .into_iter()
        .filter_map(|(key, value)| match value {
            Value::String(s) => Some((key, s)),
            Value::Null => None,
            other => Some((key, other.to_string())),
        })
        .collect();
    TelemetryEvent {
        event_parts: line.event_parts,
        measurements,
        metadata,
        timestamp_ns: line.timestamp_ns,
        correlation_id: line.correlation_id,
        span_id: line.span_id.as_u64().unwrap_or(0),
        stacktrace: frames(line.stacktrace),
    }
}

/// Traceback frames of a line (the decoder bounds them).
fn frames(value: Value) -> Vec<TelemetryFrame> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let text = |frame: &mut serde_json::Map<String, Value>, key: &str| match frame.remove(key) {
        Some(Value::String(s)) => s,
        _ => String::new(),
    };
    items
        .into_iter()
        .filter_map(|item| match item {
            Value::Object(mut frame) => Some(TelemetryFrame {
                file: text(&mut frame, "file"),
                line: frame
                    .get("line")
                    .and_then(Value::as_u64)
                    .and_then(|l| u32::try_from(l).ok())
                    .unwrap_or(0),
                function: text(&mut frame, "function"),
            }),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Sym;
    use crate::decode::{DecodeConfig, Key, Number};

    fn decode(line: &str) -> (Result<Decoded, LineError>, StreamStats) {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(DecodeConfig::default());
        let result = decode_line(line, 65_536, &mut decoder, &stats);
        (result, stats)
    }

    #[test]
    fn a_line_decodes_like_the_same_event_over_grpc() {
        let line = r#"SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","stop"],"measurements":{"duration":1500,"ratio":0.5,"bad":"NaN"},"metadata":{"command":"predict","n":3},"timestamp_ns":7,"correlation_id":"c1"}"#;
        let (result, stats) = decode(line);
        let d = result.unwrap();
        assert_eq!(d.event.spec().unwrap().python, Some("python.call.stop"));
        let mut m = d.measurements.clone();
        m.sort_by_key(|(k, _)| format!("{k:?}"));
        assert_eq!(
            m,
            vec![
                (Key::Known(Sym::duration), Number::Int(1500)),
                (Key::Unknown("ratio".into()), Number::Float(0.5)),
            ]
        );
        assert!(d
            .metadata
            .contains(&(Key::Known(Sym::command), "predict".to_string())));
        assert!(d
            .metadata
            .contains(&(Key::Unknown("n".into()), "3".to_string())));
        assert_eq!(d.correlation_id.as_deref(), Some("c1"));
        assert_eq!(StreamStats::get(&stats.dropped_measurements), 1);
    }

    #[test]
    fn other_lines_and_bad_lines_are_told_apart_and_counted() {
        assert_eq!(
            decode("Traceback (most recent call last):").0.unwrap_err(),
            LineError::NotTelemetry
        );
        let (r, stats) = decode("SNAKEPIT_TELEMETRY_EVENT {not json");
        assert_eq!(r.unwrap_err(), LineError::InvalidJson);
        assert_eq!(StreamStats::get(&stats.dropped_malformed), 1);
        let (r, stats) = decode(r#"SNAKEPIT_TELEMETRY_EVENT {"event_parts":["zz","made","up"]}"#);
        assert_eq!(r.unwrap_err(), LineError::Rejected(Rejected::UnknownEvent));
        assert_eq!(StreamStats::get(&stats.dropped_unknown_event), 1);
        let long = format!("{PREFIX}{}", "x".repeat(70_000));
        assert_eq!(decode(&long).0.unwrap_err(), LineError::TooLarge);
    }

    fn decode_bytes(line: &[u8]) -> (Result<Decoded, LineError>, StreamStats) {
        let stats = StreamStats::default();
        let mut decoder = Decoder::new(DecodeConfig::default());
        let result = decode_line_bytes(line, 65_536, &mut decoder, &stats);
        (result, stats)
    }

    #[test]
    fn invalid_utf8_drops_the_line_and_counts_it() {
        // In a string value, in a key, and outside any string.
        for bad in [
            &b"{\"event_parts\":[\"python\",\"call\",\"stop\"],\"metadata\":{\"k\":\"\xff\"}}"[..],
            &b"{\"event_parts\":[\"python\",\"call\",\"stop\"],\"metadata\":{\"\xc3\x28\":\"v\"}}"
                [..],
            &b"\xed\xa0\x80{}"[..],
        ] {
            let line = [PREFIX.as_bytes(), bad].concat();
            let (result, stats) = decode_bytes(&line);
            assert_eq!(result.unwrap_err(), LineError::InvalidUtf8);
            assert_eq!(StreamStats::get(&stats.received), 1);
            assert_eq!(StreamStats::get(&stats.dropped_malformed), 1);
        }
        // Not a telemetry line: ignored whatever its bytes, and not counted.
        let (result, stats) = decode_bytes(b"\xff\xfe worker noise");
        assert_eq!(result.unwrap_err(), LineError::NotTelemetry);
        assert_eq!(StreamStats::get(&stats.received), 0);
        // Oversized is refused before the bytes are looked at.
        let long = [PREFIX.as_bytes(), &[0xff; 70_000][..]].concat();
        assert_eq!(decode_bytes(&long).0.unwrap_err(), LineError::TooLarge);
    }

    #[test]
    fn a_valid_line_decodes_the_same_from_bytes() {
        let line = r#"SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","stop"],"measurements":{"duration":1},"metadata":{"k":"\u00e9t\u00e9"}}"#;
        let (result, _) = decode_bytes(line.as_bytes());
        let d = result.unwrap();
        assert!(d
            .metadata
            .contains(&(Key::Unknown("k".into()), "été".to_string())));
    }

    #[test]
    fn only_json_whitespace_may_surround_the_object() {
        // From the json_line fuzz target: vertical tabs before the object
        // were trimmed away as whitespace, which JSON does not allow.
        for pad in ["\u{b}", "\u{a0}", "\u{2003}", "\u{c}"] {
            let line = format!(r#"{PREFIX}{pad}{{"event_parts":["python","call","stop"]}}"#);
            let (result, stats) = decode(&line);
            assert_eq!(result.unwrap_err(), LineError::InvalidJson, "{pad:?}");
            assert_eq!(StreamStats::get(&stats.dropped_malformed), 1);
        }
        let line = format!("{PREFIX} \t\r{{\"event_parts\":[\"python\",\"call\",\"stop\"]}}\r\n");
        assert!(decode(&line).0.is_ok());
    }

    #[test]
    fn only_an_object_is_a_line() {
        // From the json_line fuzz target: serde reads a struct from a JSON
        // array too (fields by position), so this decoded as an event.
        for json in [
            r#"[["tool.execution.start"]]"#,
            r#"[["python","call","stop"],{"duration":1},{},5,"c"]"#,
        ] {
            let (result, stats) = decode(&format!("{PREFIX}{json}"));
            assert_eq!(result.unwrap_err(), LineError::InvalidJson, "{json}");
            assert_eq!(StreamStats::get(&stats.dropped_malformed), 1);
        }
        let (result, _) = decode(&format!(
            "{PREFIX} {{\"event_parts\":[\"python\",\"call\",\"stop\"]}} \n"
        ));
        assert!(result.is_ok(), "whitespace around the object is fine");
    }

    #[test]
    fn fields_the_line_does_not_know_are_skipped_whatever_they_hold() {
        // From the json_line fuzz target: a strict JSON parse refuses a
        // number out of f64 range and a lone surrogate escape; in a field the
        // decoder does not read they are skipped and the event decodes.
        let line = r#"SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","stop"],"extra":2e308,"other":["\ud800"],"metadata":{"command":"predict"}}"#;
        let (result, stats) = decode(line);
        assert_eq!(
            result.unwrap().metadata,
            vec![(Key::Known(Sym::command), "predict".to_string())]
        );
        assert_eq!(StreamStats::get(&stats.dropped_malformed), 0);
        // In a field it reads, the same values make the line invalid.
        for bad in [r#"{"command":"\ud800"}"#, r#"{"command":2e308}"#] {
            let line =
                format!(r#"{PREFIX}{{"event_parts":["python","call","stop"],"metadata":{bad}}}"#);
            let (result, stats) = decode(&line);
            assert_eq!(result.unwrap_err(), LineError::InvalidJson, "{bad}");
            assert_eq!(StreamStats::get(&stats.dropped_malformed), 1);
        }
    }

    #[test]
    fn a_line_carries_span_id_traceback_and_emit_time_and_loses_reserved_keys() {
        let line = r#"SNAKEPIT_TELEMETRY_EVENT {"event_parts":["python","call","exception"],"measurements":{"duration":5,"monotonic_time":1},"metadata":{"worker_id":"evil","node":"evil@host","error_type":"ValueError"},"timestamp_ns":9,"span_id":18446744073709551615,"stacktrace":[{"file":"a.py","line":3,"function":"f"},7,{"line":-1}]}"#;
        let (result, stats) = decode(line);
        let d = result.unwrap();
        assert_eq!(d.span_id, Some(u64::MAX));
        assert_eq!(d.emit_time, Some(9));
        assert_eq!(
            d.stacktrace,
            vec![
                crate::decode::Frame {
                    file: "a.py".into(),
                    line: 3,
                    function: "f".into()
                },
                crate::decode::Frame {
                    file: String::new(),
                    line: 0,
                    function: String::new()
                },
            ]
        );
        assert_eq!(
            d.metadata,
            vec![(Key::Known(Sym::error_type), "ValueError".to_string())]
        );
        assert_eq!(StreamStats::get(&stats.reserved_keys_dropped), 3);

        // A span id that is not a positive integer is no span id; the
        // event still decodes.
        for bad in [r#""12""#, "-1", "1.5", "null"] {
            let line = format!(
                r#"SNAKEPIT_TELEMETRY_EVENT {{"event_parts":["python","call","stop"],"span_id":{bad}}}"#
            );
            assert_eq!(decode(&line).0.unwrap().span_id, None, "{bad}");
        }
    }
}
