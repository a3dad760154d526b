//! Decoded events to terms. Keys the catalog knows are preallocated atoms;
//! everything else from Python becomes a binary.

use rustler::{Encoder, Env, Term};
use snakepit_telemetry_core::catalog::Sym;
use snakepit_telemetry_core::decode::{Decoded, Event, Frame, Key, Number};
use snakepit_telemetry_core::stream::{CloseReason, Protocol, Status};

use crate::atoms::{self, sym};
use crate::custom;

/// A key's term; `None` only for a custom key whose atom is not stored yet
/// (registration stores it right after the id exists), which drops the event.
fn key<'a>(env: Env<'a>, key: &Key) -> Option<Term<'a>> {
    Some(match key {
        Key::Known(s) => sym(*s).encode(env),
        Key::Custom(id) => custom::key(*id)?.encode(env),
        Key::Unknown(text) => text.encode(env),
    })
}

fn number<'a>(env: Env<'a>, n: Number) -> Term<'a> {
    match n {
        Number::Int(i) => i.encode(env),
        // Finite by construction (the decoder drops NaN and infinities).
        Number::Float(f) => f.encode(env),
    }
}

/// `{event_name, measurements, metadata}`, or `None` if the maps cannot be
/// built (duplicate keys, which the decoder prevents for every key it sets).
pub fn event<'a>(env: Env<'a>, event: &Decoded) -> Option<Term<'a>> {
    let name = match event.event {
        Event::Catalog(id) => id
            .spec()
            .name
            .iter()
            .map(|s| sym(*s).encode(env))
            .collect::<Vec<Term<'a>>>()
            .encode(env),
        Event::Custom(id) => custom::event_name(env, id)?,
    };

    let mut mkeys = Vec::with_capacity(event.measurements.len());
    let mut mvalues = Vec::with_capacity(event.measurements.len());
    for (k, v) in &event.measurements {
        mkeys.push(key(env, k)?);
        mvalues.push(number(env, *v));
    }
    let measurements = Term::map_from_term_arrays(env, &mkeys, &mvalues).ok()?;

    let capacity = event.metadata.len() + 4;
    let mut keys = Vec::with_capacity(capacity);
    let mut values = Vec::with_capacity(capacity);
    for (k, v) in &event.metadata {
        keys.push(key(env, k)?);
        values.push(v.encode(env));
    }
    // The decoder drops these keys from Python's metadata (reserved), so
    // each is set once, here.
    if let Some(id) = &event.correlation_id {
        keys.push(sym(Sym::correlation_id).encode(env));
        values.push(id.encode(env));
    }
    if let Some(t) = event.emit_time {
        keys.push(sym(Sym::emit_time).encode(env));
        values.push(t.encode(env));
    }
    if let Some(id) = event.span_id {
        keys.push(sym(Sym::telemetry_span_context).encode(env));
        values.push(id.encode(env));
    }
    if !event.stacktrace.is_empty() {
        keys.push(sym(Sym::stacktrace).encode(env));
        values.push(stacktrace(env, &event.stacktrace));
    }
    let metadata = Term::map_from_term_arrays(env, &keys, &values).ok()?;
    Some((name, measurements, metadata).encode(env))
}

/// A Python traceback as an Erlang stacktrace that `Exception.format/3` and
/// `Exception.format_stacktrace/1` accept, with fixed atoms only: each frame
/// is `{:python, :frame, [function], [file: charlist, line: pos_integer]}`
/// (the Python function's name as the one "argument"; `line` only when
/// known, `file` only when not empty).
fn stacktrace<'a>(env: Env<'a>, frames: &[Frame]) -> Term<'a> {
    frames
        .iter()
        .map(|f| {
            let mut location: Vec<Term<'a>> = Vec::with_capacity(2);
            if !f.file.is_empty() {
                let chars: Vec<u32> = f.file.chars().map(u32::from).collect();
                location.push((atoms::file(), chars).encode(env));
            }
            if f.line > 0 {
                location.push((atoms::line(), f.line).encode(env));
            }
            (
                atoms::python(),
                atoms::frame(),
                vec![f.function.as_str()],
                location,
            )
                .encode(env)
        })
        .collect::<Vec<Term<'a>>>()
        .encode(env)
}

/// A list of event tuples and the number of events that could not be encoded.
pub fn events<'a>(env: Env<'a>, batch: &[Decoded]) -> (Term<'a>, u64) {
    let mut failed = 0;
    let terms: Vec<Term<'a>> = batch
        .iter()
        .filter_map(|e| {
            let term = event(env, e);
            failed += u64::from(term.is_none());
            term
        })
        .collect();
    (terms.encode(env), failed)
}

pub fn status<'a>(env: Env<'a>, status: &Status) -> Term<'a> {
    match status {
        Status::Connecting => atoms::connecting().encode(env),
        Status::Open(protocol) => (atoms::open(), protocol_atom(*protocol)).encode(env),
        Status::Closed(reason) => (atoms::closed(), close_reason(env, reason)).encode(env),
    }
}

fn protocol_atom(protocol: Protocol) -> rustler::Atom {
    match protocol {
        Protocol::Batches => atoms::batches(),
        Protocol::Events => atoms::events(),
    }
}

fn close_reason<'a>(env: Env<'a>, reason: &CloseReason) -> Term<'a> {
    match reason {
        CloseReason::Stopped => atoms::stopped().encode(env),
        CloseReason::EndOfStream => atoms::end_of_stream().encode(env),
        CloseReason::Error(text) => (atoms::error(), text).encode(env),
        CloseReason::ConnectFailed(text) => (atoms::connect_failed(), text).encode(env),
        CloseReason::KeepaliveTimeout => atoms::keepalive_timeout().encode(env),
    }
}
