//! Native decode cost per event, next to protobuf parsing alone.
//!
//! `cargo run --release --example decode_bench [EVENTS]` prints one JSON
//! object for bench/suite.exs: nanoseconds per event to parse a
//! `TelemetryEventBatch` with prost (the baseline: the least any decoder
//! must do), and to parse it and run every event through the [`Decoder`]
//! (catalog lookup, limits, unit scaling), as the stream task does.

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use prost::Message;
use snakepit_telemetry_core::decode::{DecodeConfig, Decoder};
use snakepit_telemetry_core::proto::{
    telemetry_value, TelemetryEvent, TelemetryEventBatch, TelemetryValue,
};
use snakepit_telemetry_core::stats::StreamStats;

const ROUNDS: usize = 30;

fn batch(events: usize) -> Vec<u8> {
    let events = (0..events)
        .map(|i| TelemetryEvent {
            event_parts: vec!["python".into(), "call".into(), "stop".into()],
            measurements: HashMap::from([(
                "duration".to_string(),
                TelemetryValue {
                    value: Some(telemetry_value::Value::IntValue(100_000 + i as i64)),
                },
            )]),
            metadata: HashMap::from([("command".to_string(), "predict".to_string())]),
            timestamp_ns: 5_000 * i as i64,
            correlation_id: String::new(),
            ..TelemetryEvent::default()
        })
        .collect();
    TelemetryEventBatch {
        events,
        base_timestamp_ns: 1_800_000_000_000_000_000,
    }
    .encode_to_vec()
}

/// Best nanoseconds per event over `ROUNDS` runs of `run` on the payload.
fn best_ns(payload: &[u8], events: usize, mut run: impl FnMut(&[u8]) -> usize) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..ROUNDS {
        let started = Instant::now();
        let seen = run(payload);
        let elapsed = started.elapsed().as_nanos() as f64;
        assert_eq!(seen, events, "every event must be decoded");
        best = best.min(elapsed / events as f64);
    }
    best
}

fn main() {
    let events: usize = std::env::args()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(2_000);
    let payload = batch(events);
    let stats = StreamStats::default();
    let mut decoder = Decoder::new(DecodeConfig::default());

    let parse_ns = best_ns(&payload, events, |bytes| {
        let batch = TelemetryEventBatch::decode(bytes).expect("valid batch");
        black_box(&batch);
        batch.events.len()
    });
    let decode_ns = best_ns(&payload, events, |bytes| {
        let batch = TelemetryEventBatch::decode(bytes).expect("valid batch");
        let mut decoded = 0;
        for event in batch.events {
            if let Ok(event) = decoder.decode(event, &stats) {
                black_box(event);
                decoded += 1;
            }
        }
        decoded
    });
    println!(
        "{{\"events\":{events},\"bytes_per_event\":{:.1},\"prost_parse_ns\":{parse_ns:.1},\"decode_ns\":{decode_ns:.1}}}",
        payload.len() as f64 / events as f64
    );
}
