//! The stderr path: decodes a worker's `SNAKEPIT_TELEMETRY_EVENT {...}`
//! output line with the same decoder as the gRPC path.
//!
//! Runs on the calling scheduler: a line is bounded by `max_message_bytes`
//! and decoding it takes microseconds.

use once_cell::sync::Lazy;
use rustler::{Atom, Encoder, Env, Term};
use snakepit_telemetry_core::decode::{Decoder, Rejected};
use snakepit_telemetry_core::json::{decode_line, LineError};
use snakepit_telemetry_core::stats::StreamStats;

use crate::atoms;
use crate::encode;
use crate::stream::{stats_map, OpenOptions};

/// Counters of every line decoded in this VM.
static STATS: Lazy<StreamStats> = Lazy::new(StreamStats::default);

fn reason(error: &LineError) -> Atom {
    match error {
        LineError::NotTelemetry => atoms::not_telemetry(),
        LineError::TooLarge => atoms::too_large(),
        LineError::InvalidJson => atoms::invalid_json(),
        LineError::Rejected(Rejected::UnknownEvent) => atoms::unknown_event(),
        LineError::Rejected(Rejected::Malformed) => atoms::malformed(),
    }
}

/// `{:ok, {event, measurements, metadata}}` or `{:error, reason}`.
#[rustler::nif]
fn decode_json_line<'a>(env: Env<'a>, line: String, options: OpenOptions) -> Term<'a> {
    let mut decoder = Decoder::new(options.decode_config());
    match decode_line(&line, options.max_message_bytes(), &mut decoder, &STATS) {
        Ok(decoded) => match encode::event(env, &decoded) {
            Some(term) => {
                StreamStats::add(&STATS.delivered, 1);
                (atoms::ok(), term).encode(env)
            }
            None => {
                StreamStats::add(&STATS.dropped_encode, 1);
                (atoms::error(), atoms::encode_failed()).encode(env)
            }
        },
        Err(error) => (atoms::error(), reason(&error)).encode(env),
    }
}

/// Counters of the stderr path, with the same keys as a stream's.
#[rustler::nif]
fn json_stats<'a>(env: Env<'a>) -> Term<'a> {
    stats_map(env, &STATS)
}
