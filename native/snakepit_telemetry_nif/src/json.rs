//! The stderr path: decodes a worker's `SNAKEPIT_TELEMETRY_EVENT {...}`
//! output line with the same decoder as the gRPC path.
//!
//! No input makes these NIFs raise: the line is taken as any term (a
//! non-binary is refused and counted), its bytes need not be UTF-8 (a line
//! that is not is dropped and counted, like an event with invalid UTF-8 on
//! the gRPC path), and the options are checked here too.
//!
//! Scheduling: a line of up to [`SMALL_LINE_BYTES`] is decoded on the
//! calling (normal) scheduler; for a longer one `decode_json_line_nif` returns
//! `:dirty` at once, and `Snakepit.Telemetry.Native.decode_json_line/2` calls
//! `decode_json_line_dirty`, which runs on a dirty CPU scheduler. A line is
//! bounded by `max_message_bytes` (4 MiB by default), and parsing 4 MiB of
//! JSON with many entries takes tens to hundreds of milliseconds, which must
//! never hold a normal scheduler (the budget is 1 ms).

use std::sync::atomic::AtomicU64;

use once_cell::sync::Lazy;
use rustler::{Atom, Binary, Encoder, Env, Term};
use snakepit_telemetry_core::decode::{Decoder, Rejected};
use snakepit_telemetry_core::json::{decode_line_bytes, LineError, PREFIX};
use snakepit_telemetry_core::stats::StreamStats;

use crate::atoms;
use crate::encode;
use crate::stream::{stats_map, OpenOptions};

/// Longest line decoded on a normal scheduler. Measured on a 2-core VM
/// under heavy load (load average 10-14): an 8 KiB line decodes and encodes
/// in a median 22 us (metadata entries) to 63 us (float measurements); the
/// costliest content tried (duplicate keys) takes about 11 ns a byte, 90 us
/// for 8 KiB: a tenth of the 1 ms budget. A 4 MiB line takes about 100 ms.
/// The dirty variant costs about 1 us more per call (median, 1 KiB line),
/// which short lines, the common case, do not pay.
pub const SMALL_LINE_BYTES: usize = 8 * 1024;

/// Counters of every line decoded in this VM.
static STATS: Lazy<StreamStats> = Lazy::new(StreamStats::default);

/// Why lines were dropped before decoding, by reason (each such line is also
/// in `received` and `dropped_malformed`), and calls refused outright.
#[derive(Default)]
struct LineStats {
    too_large: AtomicU64,
    invalid_utf8: AtomicU64,
    invalid_json: AtomicU64,
    /// Calls whose line was not a binary, whose options were not valid, or
    /// (counted from Elixir) whose worker context was incomplete. Not lines
    /// of a worker, so not in `received`.
    invalid_input: AtomicU64,
}

static LINES: Lazy<LineStats> = Lazy::new(LineStats::default);

fn reason(error: &LineError) -> Atom {
    match error {
        LineError::NotTelemetry => atoms::not_telemetry(),
        LineError::TooLarge => {
            StreamStats::add(&LINES.too_large, 1);
            atoms::too_large()
        }
        LineError::InvalidUtf8 => {
            StreamStats::add(&LINES.invalid_utf8, 1);
            atoms::invalid_utf8()
        }
        LineError::InvalidJson => {
            StreamStats::add(&LINES.invalid_json, 1);
            atoms::invalid_json()
        }
        LineError::Rejected(Rejected::UnknownEvent) => atoms::unknown_event(),
        LineError::Rejected(Rejected::Malformed) => atoms::malformed(),
    }
}

fn invalid_input<'a>(env: Env<'a>, why: Atom) -> Term<'a> {
    StreamStats::add(&LINES.invalid_input, 1);
    (atoms::error(), why).encode(env)
}

fn decode<'a>(env: Env<'a>, line: Term<'a>, options: Term<'a>, dirty: bool) -> Term<'a> {
    let Ok(line) = line.decode::<Binary>() else {
        return invalid_input(env, atoms::invalid_line());
    };
    let Ok(options) = options.decode::<OpenOptions>() else {
        return invalid_input(env, atoms::invalid_options());
    };
    let bytes = line.as_slice();
    // A long telemetry line goes to the dirty variant; a long line of other
    // output costs only the prefix check.
    if !dirty && bytes.len() > SMALL_LINE_BYTES && bytes.starts_with(PREFIX.as_bytes()) {
        return atoms::dirty().encode(env);
    }
    if !dirty {
        // A NIF call costs the caller about one reduction whatever it does,
        // so a process decoding a backlog of lines would otherwise stay on
        // the scheduler for hundreds of them. Charge the work: a line of
        // SMALL_LINE_BYTES is a quarter of a timeslice (it takes well under
        // that), so the caller yields after a few long lines.
        let percent = (bytes.len() * 25).div_ceil(SMALL_LINE_BYTES).clamp(1, 100);
        rustler::schedule::consume_timeslice(env, percent as i32);
    }
    let mut decoder = Decoder::new(options.decode_config());
    match decode_line_bytes(bytes, options.max_message_bytes(), &mut decoder, &STATS) {
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

/// `{:ok, {event, measurements, metadata}}`, `{:error, reason}`, or `:dirty`
/// for a telemetry line over [`SMALL_LINE_BYTES`] (call the dirty variant).
#[rustler::nif(name = "decode_json_line_nif")]
fn decode_json_line<'a>(env: Env<'a>, line: Term<'a>, options: Term<'a>) -> Term<'a> {
    decode(env, line, options, false)
}

/// `decode_json_line` for any size, on a dirty CPU scheduler.
#[rustler::nif(schedule = "DirtyCpu")]
fn decode_json_line_dirty<'a>(env: Env<'a>, line: Term<'a>, options: Term<'a>) -> Term<'a> {
    decode(env, line, options, true)
}

/// Counts one call refused in Elixir before it reached the decoder (a
/// worker context without `:pool_name`/`:worker_id`).
#[rustler::nif]
fn json_count_invalid_input() -> Atom {
    StreamStats::add(&LINES.invalid_input, 1);
    atoms::ok()
}

/// Counters of the stderr path: a stream's keys, plus `too_large`,
/// `invalid_utf8`, `invalid_json` and `invalid_input`.
#[rustler::nif]
fn json_stats<'a>(env: Env<'a>) -> Term<'a> {
    let extra = [
        (atoms::too_large(), StreamStats::get(&LINES.too_large)),
        (atoms::invalid_utf8(), StreamStats::get(&LINES.invalid_utf8)),
        (atoms::invalid_json(), StreamStats::get(&LINES.invalid_json)),
        (
            atoms::invalid_input(),
            StreamStats::get(&LINES.invalid_input),
        ),
    ];
    extra
        .iter()
        .try_fold(stats_map(env, &STATS), |map, (key, value)| {
            map.map_put(key.encode(env), value.encode(env))
        })
        .expect("a map accepts new keys")
}
