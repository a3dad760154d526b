//! The compiled-in catalog, described to Elixir so that
//! `Snakepit.Telemetry.Naming` answers from the same tables the decoder uses.

use rustler::{Encoder, Env, Term};
use snakepit_telemetry_core::catalog::{metadata_keys, EVENTS};

use crate::atoms::{self, sym};

/// A list of maps: `%{python: "python.call.stop", name: [...],
/// measurements: [{:duration, "native time"}], metadata: [...], doc: "..."}`.
#[rustler::nif]
fn catalog_events<'a>(env: Env<'a>) -> Term<'a> {
    let events: Vec<Term<'a>> = EVENTS
        .iter()
        .map(|e| {
            let name: Vec<_> = e.name.iter().map(|s| sym(*s)).collect();
            let measurements: Vec<_> = e
                .measurements
                .iter()
                .map(|m| (sym(m.key), m.unit.name()))
                .collect();
            let metadata: Vec<_> = e.metadata.iter().map(|s| sym(*s)).collect();
            let keys = [
                atoms::python().encode(env),
                atoms::name().encode(env),
                atoms::measurements().encode(env),
                atoms::metadata().encode(env),
                atoms::doc().encode(env),
            ];
            let values = [
                e.python.encode(env),
                name.encode(env),
                measurements.encode(env),
                metadata.encode(env),
                e.doc.encode(env),
            ];
            Term::map_from_term_arrays(env, &keys, &values).expect("distinct keys")
        })
        .collect();
    events.encode(env)
}

/// Metadata keys that arrive as atoms; every other key arrives as a binary.
#[rustler::nif]
fn catalog_metadata_keys<'a>(env: Env<'a>) -> Term<'a> {
    let keys: Vec<_> = metadata_keys().into_iter().map(sym).collect();
    keys.encode(env)
}
